"""testing_ackall (bench plugin): acks every message without looking at it
and without the SDK's wrappers, so `msmq bench plugin` on it measures what a
Python component pays to receive a batch (lifting the WIT records into
Python objects) apart from any plugin logic.
"""

import wit_world
from wit_world.imports.types import Outcome_Ack

ACK = Outcome_Ack()


class WitWorld(wit_world.WitWorld):
    def init(self, config):
        pass

    def handle_batch(self, batch):
        return [ACK] * len(batch.messages)
