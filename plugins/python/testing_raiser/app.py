"""testing_raiser (test plugin): acks every message, except that a payload
`bad` makes it raise ValueError("bad amount") from a helper function, so the
tests can check that the error and its traceback's last frame reach the
broker's log and `msmq plugin stats`.
"""

import msmq_plugin as mp


def amount_of(message):
    if message.payload == b"bad":
        raise ValueError("bad amount")
    return len(message.payload)


@mp.plugin
class Raiser:
    def init(self, config):
        pass

    def handle(self, batch):
        for m in batch:
            amount_of(m)
        return [mp.Ack()] * len(batch)
