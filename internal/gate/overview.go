package gate

import (
	"fmt"
	"net/url"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/policy"
)

// Overview is what the status page on the main listener shows. The main
// listener is unauthenticated, so Overview holds only what any fleet machine
// may see: counts, reason codes, store paths and derivers (names of builds,
// which the fleet asks for by name), upstream URLs without user information
// and attester public keys. It never holds a decision's detail text (it can
// quote operators' allowlist and denylist reasons, or upstream error text),
// allowlist or denylist entries, quarantine details, tokens, or file system
// paths (a file:// upstream is shown by its position only).
type Overview struct {
	Time         time.Time
	Uptime       time.Duration // since the in-memory counts began
	Mode         string        // "enforce" or "report"
	PublicKey    string        // the gatekeeper key line for trusted-public-keys
	Windows      []OverviewWindow
	Reasons      []ReasonCounts      // every reason, in the order of the decision rules
	Rejections   []OverviewRejection // newest first, at most OverviewRejections
	Upstreams    []OverviewUpstream  // in the configured order
	CacheSize    int64
	CacheMaxSize int64 // 0: no limit
	Attesters    []OverviewAttester
}

// OverviewRejections is how many of the latest rejections the status page
// lists.
const OverviewRejections = 50

// OverviewWindow is the totals and cache lookups of one recent span.
type OverviewWindow struct {
	Name string // "last hour", "last day"
	// Span is what the counts cover: less than Want when the process
	// started less than Want ago (counts are kept in memory since start).
	Span, Want time.Duration
	Approved   uint64
	Rejected   uint64
	Hits       map[string]uint64 // by kind: narinfo (stored decision), nar (cached blob)
	Misses     map[string]uint64
}

// ReasonCounts is the number of decisions with one reason in each window.
type ReasonCounts struct {
	Reason   policy.Reason
	Approved bool
	Counts   []uint64 // one per Overview.Windows
}

// HitRatio is hits/(hits+misses) of one kind, and false when there were
// no lookups.
func (w OverviewWindow) HitRatio(kind string) (float64, bool) {
	h, m := w.Hits[kind], w.Misses[kind]
	if h+m == 0 {
		return 0, false
	}
	return float64(h) / float64(h+m), true
}

// OverviewRejection is one entry of the rejection log, without its detail.
type OverviewRejection struct {
	StorePath string
	Reason    string
	Deriver   string
	Upstream  string
	Count     uint64
	Last      time.Time
	// Classification is, for attestation_mismatch, the rebuilder's
	// verdict: stable (the alarm) or not_reproducible.
	Classification string
}

// OverviewUpstream is one upstream's health.
type OverviewUpstream struct {
	Name string
	Up   bool
}

// OverviewAttester is the number of stored attestations by one attester key.
type OverviewAttester struct {
	Name       string
	PublicKey  string
	Count      int
	Configured bool // in policy.attesters now; stored attestations of other keys count for nothing
}

// overviewCache keeps the attestation counts by key between status page
// loads: counting visits every attestation, so it is redone only when the
// evidence changed, and then at most once per 100 times the last count
// took, so that reloading the page cannot keep the state store busy.
type overviewCache struct {
	mu      sync.Mutex
	valid   bool
	changes uint64
	next    time.Time
	counts  map[string]int
}

func (g *Gate) attestationCounts() (map[string]int, error) {
	c := &g.overviewCache
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	changes := g.db.Changes()
	if c.valid && (changes == c.changes || now.Before(c.next)) {
		return c.counts, nil
	}
	counts, err := g.db.AttestationsByKey()
	if err != nil {
		return nil, fmt.Errorf("count attestations: %w", err)
	}
	c.valid, c.changes, c.counts = true, changes, counts
	c.next = time.Now().Add(100 * time.Since(now))
	return counts, nil
}

// settingsMetrics sets the gauges of the settings and creates the series
// that alerts and dashboards need before the first event; New and
// Reconfigure call it.
func (g *Gate) settingsMetrics(s Settings) {
	g.m.DiskReserve.Set(float64(s.DiskReserve))
	for _, u := range s.Upstreams {
		g.m.UpstreamSeries(u.Name())
	}
}

// overviewSettings is all that Overview reads of the gate's settings.
func (g *Gate) overviewSettings() (policy.Policy, []Upstream) {
	c := g.conf()
	return c.policy, c.upstreams
}

// Overview gathers what the status page shows.
func (g *Gate) Overview() (Overview, error) {
	now := g.now()
	pol, ups := g.overviewSettings()
	st := Overview{Time: now, Mode: "enforce", PublicKey: g.key.Public().String(),
		CacheSize: g.blobs.Size(), CacheMaxSize: g.blobs.MaxSize(), Uptime: max(now.Sub(g.m.Decisions.Window.Start()), 0)}
	if pol.Report {
		st.Mode = "report"
	}
	for _, r := range policy.Reasons {
		st.Reasons = append(st.Reasons, ReasonCounts{Reason: r, Approved: r.Approves()})
	}
	for _, w := range []struct {
		name string
		d    time.Duration
	}{{"last hour", time.Hour}, {"last day", 24 * time.Hour}} {
		sums, span := g.m.Decisions.Window.Sums(now, w.d)
		win := OverviewWindow{Name: w.name, Span: span, Want: w.d}
		for i := range st.Reasons {
			rc := &st.Reasons[i]
			n := sums[string(rc.Reason)]
			rc.Counts = append(rc.Counts, n)
			if rc.Approved {
				win.Approved += n
			} else {
				win.Rejected += n
			}
		}
		win.Hits, _ = g.m.CacheHits.Window.Sums(now, w.d)
		win.Misses, _ = g.m.CacheMisses.Window.Sums(now, w.d)
		st.Windows = append(st.Windows, win)
	}
	rejs, err := g.db.LatestRejections(OverviewRejections)
	if err != nil {
		return Overview{}, fmt.Errorf("read rejections: %w", err)
	}
	for _, r := range rejs {
		st.Rejections = append(st.Rejections, OverviewRejection{StorePath: r.StorePath, Reason: r.Reason,
			Deriver: r.Deriver, Upstream: publicUpstreamName(ups, r.Upstream), Count: r.Count, Last: r.Last,
			Classification: r.Classification})
	}
	for _, u := range ups {
		st.Upstreams = append(st.Upstreams, OverviewUpstream{Name: publicUpstreamName(ups, u.Name()), Up: u.Client.Up()})
	}
	counts, err := g.attestationCounts()
	if err != nil {
		return Overview{}, err
	}
	seen := map[string]bool{}
	for _, k := range pol.Attesters {
		s := k.String()
		seen[s] = true
		st.Attesters = append(st.Attesters, OverviewAttester{Name: k.Name, PublicKey: s, Count: counts[s], Configured: true})
	}
	var others []OverviewAttester
	for s, n := range counts {
		if !seen[s] {
			name, _, _ := strings.Cut(s, ":")
			others = append(others, OverviewAttester{Name: name, PublicKey: s, Count: n})
		}
	}
	sort.Slice(others, func(i, j int) bool { return others[i].PublicKey < others[j].PublicKey })
	st.Attesters = append(st.Attesters, others...)
	return st, nil
}

// publicUpstreamName is an upstream's name as the status page shows it:
// scheme, host and path of an HTTP upstream (never user information or a
// query), and no more than "local directory" with its position for a
// file:// upstream, whose path says something about the proxy's host.
func publicUpstreamName(ups []Upstream, name string) string {
	if name == "" {
		return ""
	}
	u, err := url.Parse(name)
	if err != nil || u.Scheme == "file" || u.Host == "" {
		for i, up := range ups {
			if up.Name() == name {
				return fmt.Sprintf("upstreams[%d] (local directory)", i)
			}
		}
		return "(local directory)"
	}
	return (&url.URL{Scheme: u.Scheme, Host: u.Host, Path: u.Path}).String()
}
