package metrics

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// WindowSpan is how far back a Window remembers.
const WindowSpan = 24 * time.Hour

// windowBuckets is one bucket per minute of WindowSpan.
const windowBuckets = int(WindowSpan / time.Minute)

// maxWindowKeys bounds the distinct keys a Window keeps per minute; label
// values are fixed sets (reasons, kinds), so this only guards against a
// caller passing something unbounded. Keys past it are counted as "other".
const maxWindowKeys = 64

// Window counts events by key in per-minute buckets over the last
// WindowSpan, so that the status page can say "in the last hour" and "in
// the last day" without a Prometheus server. Memory is bounded: at most
// windowBuckets buckets of at most maxWindowKeys counts. It is safe for
// concurrent use.
type Window struct {
	mu      sync.Mutex
	start   time.Time
	buckets [windowBuckets]windowBucket
}

type windowBucket struct {
	minute int64 // unix minute the counts belong to
	counts map[string]uint64
}

// NewWindow returns an empty window that starts counting at start.
func NewWindow(start time.Time) *Window { return &Window{start: start} }

// Start is when the window began counting (the process start).
func (w *Window) Start() time.Time { return w.start }

// Add counts n events of key at now.
func (w *Window) Add(now time.Time, key string, n uint64) {
	m := now.Unix() / 60
	w.mu.Lock()
	defer w.mu.Unlock()
	b := &w.buckets[m%int64(windowBuckets)]
	if b.minute != m || b.counts == nil {
		// A bucket last used a day (or more) ago: reuse it for this minute.
		b.minute = m
		if b.counts == nil {
			b.counts = map[string]uint64{}
		}
		clear(b.counts)
	}
	if _, ok := b.counts[key]; !ok && len(b.counts) >= maxWindowKeys {
		key = "other"
	}
	b.counts[key] += n
}

// Sums returns the counts by key over the last d (at most WindowSpan),
// including the current minute, and the span they really cover: less than
// d when the window started less than d ago.
func (w *Window) Sums(now time.Time, d time.Duration) (map[string]uint64, time.Duration) {
	d = min(d, WindowSpan)
	minutes := int64(d / time.Minute)
	nowMin := now.Unix() / 60
	out := map[string]uint64{}
	w.mu.Lock()
	defer w.mu.Unlock()
	for i := range w.buckets {
		b := &w.buckets[i]
		if b.counts == nil || b.minute > nowMin || b.minute <= nowMin-minutes {
			continue
		}
		for k, n := range b.counts {
			out[k] += n
		}
	}
	return out, min(d, max(now.Sub(w.start), 0))
}

// RollingCounterVec is a CounterVec whose increments are also counted, by
// one of its labels, in a Window. Use WithLabelValues: the other accessors
// of the embedded CounterVec (With, GetMetricWith...) bypass the window.
type RollingCounterVec struct {
	*prometheus.CounterVec
	Window *Window
	key    int // index of the label that keys the window
	now    func() time.Time
}

func newRollingCounterVec(opts prometheus.CounterOpts, labels []string, key string, now func() time.Time) *RollingCounterVec {
	v := &RollingCounterVec{CounterVec: prometheus.NewCounterVec(opts, labels), Window: NewWindow(now()), now: now}
	for i, l := range labels {
		if l == key {
			v.key = i
		}
	}
	return v
}

// WithLabelValues returns the counter of these label values; its Inc and
// Add also count in the window.
func (v *RollingCounterVec) WithLabelValues(lvs ...string) prometheus.Counter {
	key := ""
	if v.key < len(lvs) {
		key = lvs[v.key]
	}
	return rollingCounter{Counter: v.CounterVec.WithLabelValues(lvs...), v: v, key: key}
}

type rollingCounter struct {
	prometheus.Counter
	v   *RollingCounterVec
	key string
}

func (c rollingCounter) Inc() {
	c.Counter.Inc()
	c.v.Window.Add(c.v.now(), c.key, 1)
}

func (c rollingCounter) Add(f float64) {
	c.Counter.Add(f)
	if f >= 1 {
		c.v.Window.Add(c.v.now(), c.key, uint64(f))
	}
}
