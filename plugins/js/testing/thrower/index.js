// thrower: acks every message but throws `bad amount` on a payload of
// `bad`, to show how an exception surfaces in the broker's log (the batch is
// rolled back and delivered again, then the message is dead-lettered as
// poison after the deploy's --delivery-attempts). It also writes one line
// per batch with console.log, which the broker logs as the plugin's stdout.

import { definePlugin, ack } from '../../msmq-plugin.js';

function checkAmount(text) {
  if (text === 'bad') throw new Error('bad amount');
}

export const { init, handlePacked } = definePlugin({
  handle(batch) {
    console.log(`thrower: a batch of ${batch.length} from ${batch.topic}`);
    return batch.messages.map((m) => {
      checkAmount(m.text(true));
      return ack();
    });
  },
});
