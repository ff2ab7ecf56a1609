package metrics

import (
	"fmt"
	"io"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestWindowSums(t *testing.T) {
	start := time.Date(2026, 1, 1, 10, 0, 30, 0, time.UTC)
	w := NewWindow(start)
	w.Add(start, "a", 1)
	w.Add(start.Add(30*time.Minute), "a", 2)
	w.Add(start.Add(30*time.Minute), "b", 5)
	w.Add(start.Add(90*time.Minute), "a", 4)

	now := start.Add(100 * time.Minute)
	hour, span := w.Sums(now, time.Hour)
	if hour["a"] != 4 || hour["b"] != 0 || span != time.Hour {
		t.Errorf("last hour at +100m: %v over %v, want a=4 over 1h", hour, span)
	}
	day, span := w.Sums(now, 24*time.Hour)
	if day["a"] != 7 || day["b"] != 5 || span != 100*time.Minute {
		t.Errorf("last day at +100m: %v over %v, want a=7 b=5 over 100m (since start)", day, span)
	}

	// A day later the early buckets have left the window, and a bucket
	// reused for a new minute starts from zero.
	later := start.Add(24*time.Hour + 30*time.Minute)
	w.Add(later, "a", 1)
	day, span = w.Sums(later, 48*time.Hour)
	if day["a"] != 5 || day["b"] != 0 || span != WindowSpan {
		t.Errorf("last day at +24h30m: %v over %v, want a=5 (4 from +90m, 1 now) over 24h", day, span)
	}
}

func TestWindowBoundsKeys(t *testing.T) {
	now := time.Now()
	w := NewWindow(now)
	for i := range 3 * maxWindowKeys {
		w.Add(now, fmt.Sprint("k", i), 1)
	}
	sums, _ := w.Sums(now, time.Hour)
	if len(sums) != maxWindowKeys+1 || sums["other"] != 2*maxWindowKeys {
		t.Errorf("%d keys, other=%d; want %d keys and the rest as other", len(sums), sums["other"], maxWindowKeys+1)
	}
}

// The rolling counters count in Prometheus and in the window alike.
func TestRollingCounterVec(t *testing.T) {
	m := New()
	m.Decisions.WithLabelValues("rejected", "unattested").Inc()
	m.Decisions.WithLabelValues("rejected", "unattested").Add(2)
	m.CacheHits.WithLabelValues("nar").Inc()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	if want := `cacheproxy_decisions_total{decision="rejected",reason="unattested"} 3`; !strings.Contains(string(body), want) {
		t.Errorf("/metrics lacks %s", want)
	}
	sums, _ := m.Decisions.Window.Sums(time.Now(), time.Hour)
	if sums["unattested"] != 3 || len(sums) != 1 {
		t.Errorf("window: %v, want unattested=3", sums)
	}
	if hits, _ := m.CacheHits.Window.Sums(time.Now(), time.Hour); hits["nar"] != 1 {
		t.Errorf("hits window: %v", hits)
	}
}
