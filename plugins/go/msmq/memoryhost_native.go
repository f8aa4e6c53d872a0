//go:build !wasip1

package msmq

import (
	"sort"
	"strings"
)

// MemoryHost is a Host keeping state in a map, for tests. Refuse, when set,
// is asked about every entry of StatePut and StatePutMany; an error refuses
// the whole write, as the broker does.
type MemoryHost struct {
	State        map[string][]byte
	Published    []NewMessage
	Logs         []string
	Now          uint64
	Refuse       func(e Entry) *HostError
	GetManyCalls int
	PutManyCalls int
}

func NewMemoryHost() *MemoryHost { return &MemoryHost{State: map[string][]byte{}} }

func (h *MemoryHost) Log(_ Level, m string) { h.Logs = append(h.Logs, m) }

func (h *MemoryHost) Publish(m *NewMessage) *HostError {
	h.Published = append(h.Published, *m)
	return nil
}

func (h *MemoryHost) StateGet(k string) ([]byte, bool) {
	v, ok := h.State[k]
	return v, ok
}

func (h *MemoryHost) StatePut(k string, v []byte) *HostError {
	if h.Refuse != nil {
		if err := h.Refuse(Entry{k, v}); err != nil {
			return err
		}
	}
	h.State[k] = append([]byte{}, v...)
	return nil
}

func (h *MemoryHost) StateDelete(k string) { delete(h.State, k) }

func (h *MemoryHost) StateScan(prefix string, after *string, limit uint32) []Entry {
	var keys []string
	for k := range h.State {
		if strings.HasPrefix(k, prefix) && (after == nil || k > *after) {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	if uint32(len(keys)) > limit {
		keys = keys[:limit]
	}
	out := make([]Entry, len(keys))
	for i, k := range keys {
		out[i] = Entry{k, h.State[k]}
	}
	return out
}

func (h *MemoryHost) StateGetMany(keys []string) [][]byte {
	h.GetManyCalls++
	out := make([][]byte, len(keys))
	for i, k := range keys {
		out[i] = h.State[k]
	}
	return out
}

func (h *MemoryHost) StatePutMany(es []Entry) *HostError {
	h.PutManyCalls++
	for _, e := range es {
		if h.Refuse != nil {
			if err := h.Refuse(e); err != nil {
				return err
			}
		}
	}
	for _, e := range es {
		h.State[e.Key] = append([]byte{}, e.Value...)
	}
	return nil
}

func (h *MemoryHost) NowMs() uint64 { return h.Now }
