//go:build !wasip1

package main

import (
	"strings"
	"testing"

	"msmqplugins/msmq"
)

func msg(id uint64, payload string) msmq.Message {
	return msmq.Message{ID: msmq.MessageID{Hi: 1, Lo: id}, Attempt: 1, Payload: []byte(payload)}
}

func run(t *testing.T, h *msmq.MemoryHost, msgs ...msmq.Message) []msmq.Outcome {
	t.Helper()
	msmq.TestHost = h
	p, err := msmq.Instantiate(nil)
	if err != nil {
		t.Fatal(err)
	}
	calls := h.GetManyCalls
	outs := p.HandleBatch(&msmq.Batch{Topic: "transfers", Messages: msgs})
	if len(outs) != len(msgs) {
		t.Fatalf("%d outcomes for %d messages", len(outs), len(msgs))
	}
	if h.GetManyCalls != calls+1 {
		t.Fatalf("%d state-get-many calls, want 1", h.GetManyCalls-calls)
	}
	return outs
}

func state(h *msmq.MemoryHost, k string) string { return string(h.State[k]) }

func TestBalancesInOrderWithRepeats(t *testing.T) {
	h := msmq.NewMemoryHost()
	h.State["bill/alice"] = []byte("100")
	outs := run(t, h,
		msg(1, "t1|alice|bob|30"),
		msg(2, "t2|bob|carol|10"),
		msg(1, "t1|alice|bob|30"), // same id again in the batch
		msg(3, "t3|alice|alice|5"),
		msg(4, "t4|carol|alice|7"),
	)
	for i, o := range outs {
		if !o.IsAck() {
			t.Fatalf("outcome %d = %v", i, o)
		}
	}
	for k, want := range map[string]string{"bill/alice": "77", "bill/bob": "20", "bill/carol": "3"} {
		if got := state(h, k); got != want {
			t.Errorf("%s = %q, want %q", k, got, want)
		}
	}
	if state(h, "seen/0000000000000001"+"0000000000000003") != "1" {
		t.Error("message 3 not marked seen")
	}
	if h.PutManyCalls != 1 {
		t.Errorf("%d state-put-many calls, want 1", h.PutManyCalls)
	}
	// Redelivery: acked, nothing changes.
	outs = run(t, h, msg(2, "t2|bob|carol|10"))
	if !outs[0].IsAck() || state(h, "bill/bob") != "20" {
		t.Fatalf("redelivery changed state: %v %s", outs[0], state(h, "bill/bob"))
	}
}

func TestMalformed(t *testing.T) {
	h := msmq.NewMemoryHost()
	for _, p := range []string{"x|a|b", "x|a|b|0", "x|a|b|-3", "x|a|b|+3", "x| |b|3", "x|a|b|99999999999999999999", "x|a|b|\xff", "x|a|b|9223372036854775808"} {
		outs := run(t, h, msg(9, p))
		r, ok := outs[0].DeadLetterReason()
		if !ok || !strings.HasPrefix(r, "malformed transfer: ") {
			t.Errorf("%q: %v", p, outs[0])
		}
	}
	if len(h.State) != 0 {
		t.Errorf("malformed messages wrote state: %v", h.State)
	}
}

func TestOverflowAndBadBalance(t *testing.T) {
	h := msmq.NewMemoryHost()
	h.State["bill/rich"] = []byte("9223372036854775807")
	h.State["bill/bad"] = []byte("12x")
	outs := run(t, h, msg(1, "t|a|rich|1"), msg(2, "t|bad|a|1"), msg(3, "t|a|b|1"))
	if r, _ := outs[0].DeadLetterReason(); r != "balance would overflow a 64-bit integer" {
		t.Errorf("overflow: %v", outs[0])
	}
	if r, _ := outs[1].DeadLetterReason(); !strings.Contains(r, "bill/bad") {
		t.Errorf("bad balance: %v", outs[1])
	}
	if !outs[2].IsAck() || state(h, "bill/a") != "-1" {
		t.Errorf("good message: %v, bill/a=%q", outs[2], state(h, "bill/a"))
	}
}

func TestRefusedWriteRetriesOnlyItsMessage(t *testing.T) {
	h := msmq.NewMemoryHost()
	h.Refuse = func(e msmq.Entry) *msmq.HostError {
		if len(e.Key) > 40 {
			return &msmq.HostError{Kind: msmq.TooLarge, Message: "key too long"}
		}
		return nil
	}
	long := strings.Repeat("L", 50)
	var msgs []msmq.Message
	for i := uint64(1); i <= 10; i++ {
		msgs = append(msgs, msg(i, "t|a|b|1"))
	}
	msgs[6] = msg(7, "t|"+long+"|b|1")
	msgs[8] = msg(9, "bad")
	outs := run(t, h, msgs...)
	for i, o := range outs {
		switch i {
		case 6:
			if ms, ok := o.RetryMs(); !ok || ms != 1000 {
				t.Errorf("refused message: %v", o)
			}
		case 8:
			if _, ok := o.DeadLetterReason(); !ok {
				t.Errorf("malformed message: %v", o)
			}
		default:
			if !o.IsAck() {
				t.Errorf("outcome %d = %v", i, o)
			}
		}
	}
	if state(h, "bill/a") != "-8" || state(h, "bill/b") != "8" {
		t.Errorf("bill/a=%q bill/b=%q, want -8 and 8", state(h, "bill/a"), state(h, "bill/b"))
	}
	if _, ok := h.State["seen/00000000000000010000000000000007"]; ok {
		t.Error("the refused message was marked seen")
	}
	if h.PutManyCalls > 12 {
		t.Errorf("%d state-put-many calls for one refused message", h.PutManyCalls)
	}
}

func TestRefusedWriteRetriesAll(t *testing.T) {
	h := msmq.NewMemoryHost()
	h.Refuse = func(msmq.Entry) *msmq.HostError { return &msmq.HostError{Kind: msmq.Other, Message: "no"} }
	outs := run(t, h, msg(1, "t|a|b|1"), msg(2, "t|c|d|1"))
	for i, o := range outs {
		if ms, ok := o.RetryMs(); !ok || ms != 1000 {
			t.Errorf("outcome %d = %v", i, o)
		}
	}
	if len(h.State) != 0 {
		t.Errorf("refused write left state: %v", h.State)
	}
}
