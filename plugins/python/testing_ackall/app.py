"""testing_ackall (bench plugin): acks every message without looking at it
and without the SDK's wrappers, so `msmq bench plugin` on it measures what a
Python component pays to receive a batch (lifting the WIT `packed-batch`
into Python objects) apart from any plugin logic.
"""

import wit_world
from wit_world.imports.types import PackedOutcomes


class WitWorld(wit_world.WitWorld):
    def init(self, config):
        pass

    def handle_packed(self, batch):
        return PackedOutcomes(bytes(batch.count), [], [])
