// Package metrics holds the Prometheus collectors named in the README, on a
// registry of their own (no global registry, so tests can run several
// servers in one process). The gate counts decisions and upstream requests,
// the server counts HTTP requests; both share one Metrics.
package metrics

import (
	"math"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/cacheproxy/cacheproxy/internal/policy"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// Metrics are the collectors.
type Metrics struct {
	reg *prometheus.Registry

	// Decisions, CacheHits and CacheMisses also count in per-minute
	// windows (by reason, by kind) for the status page.
	Decisions        *RollingCounterVec
	VerifyFailures   *prometheus.CounterVec
	HTTPRequests     *prometheus.CounterVec
	HTTPDuration     *prometheus.HistogramVec
	UpstreamRequests *prometheus.CounterVec
	UpstreamDuration *prometheus.HistogramVec
	CacheHits        *RollingCounterVec
	CacheMisses      *RollingCounterVec
	CacheSize        prometheus.Gauge
	CacheMaxSize     prometheus.Gauge
	DiskReserve      prometheus.Gauge
	Evictions        prometheus.Counter
	ScrubFailures    prometheus.Counter
	UpstreamUp       *prometheus.GaugeVec
	ServedBytes      *prometheus.CounterVec
	Attestations     prometheus.Gauge
	AllowEntries     prometheus.Gauge
	// TimeToAttestation is the time from a path's first rejection to its
	// approval by attestation: how long the rebuild loop takes.
	TimeToAttestation prometheus.Histogram
	// AttestationMismatches counts attestation_mismatch decisions by what
	// the mismatching rebuilder classified its rebuild as.
	AttestationMismatches *prometheus.CounterVec

	diskFree     atomic.Pointer[func() (int64, error)] // read at each scrape; see SetDiskFree
	rebuildQueue atomic.Pointer[func() (int, error)]   // read at each scrape; see SetRebuildQueue
}

// Classifications are the label values of
// cacheproxy_attestation_mismatches_total: what the rebuilder said of its
// rebuild (policy.Classification), or unclassified when it said nothing.
var Classifications = []string{"stable", "not_reproducible", "unclassified"}

// New creates the collectors, every alerting series present at zero.
func New() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		Decisions: newRollingCounterVec(prometheus.CounterOpts{
			Name: "cacheproxy_decisions_total", Help: "Decisions made about store paths, by outcome and reason.",
		}, []string{"decision", "reason"}, "reason", time.Now),
		VerifyFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cacheproxy_nar_verification_failures_total", Help: "NAR transfers that failed verification, by failed check.",
		}, []string{"check"}),
		HTTPRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cacheproxy_http_requests_total", Help: "HTTP requests served, by handler and status code.",
		}, []string{"handler", "code"}),
		HTTPDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "cacheproxy_http_request_duration_seconds", Help: "HTTP request latency by handler.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10),
		}, []string{"handler"}),
		UpstreamRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cacheproxy_upstream_requests_total", Help: "Requests to upstream caches, by upstream, kind and result.",
		}, []string{"upstream", "kind", "result"}),
		UpstreamDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "cacheproxy_upstream_request_duration_seconds", Help: "Upstream request latency (narinfo: whole; nar: whole transfer).",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 10),
		}, []string{"upstream", "kind"}),
		CacheHits: newRollingCounterVec(prometheus.CounterOpts{
			Name: "cacheproxy_cache_hits_total", Help: "Requests answered from the local cache, by kind.",
		}, []string{"kind"}, "kind", time.Now),
		CacheMisses: newRollingCounterVec(prometheus.CounterOpts{
			Name: "cacheproxy_cache_misses_total", Help: "Requests that had to go upstream, by kind.",
		}, []string{"kind"}, "kind", time.Now),
		CacheSize: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cacheproxy_cache_size_bytes", Help: "Bytes of verified NAR blobs on disk.",
		}),
		CacheMaxSize: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cacheproxy_cache_max_size_bytes", Help: "cache.max_size: blobs are evicted least-recently-used past it (0: no limit).",
		}),
		DiskReserve: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cacheproxy_disk_reserve_bytes", Help: "cache.min_free: below this much free disk no download starts.",
		}),
		UpstreamUp: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "cacheproxy_upstream_up", Help: "1 while an upstream answers, 0 while it is marked down after repeated failures.",
		}, []string{"upstream"}),
		ScrubFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cacheproxy_cache_scrub_failures_total", Help: "Cached blobs found damaged (by size at open, or by the background re-hash) and dropped.",
		}),
		Evictions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cacheproxy_cache_evictions_total", Help: "Blobs evicted to stay within cache.max_size.",
		}),
		ServedBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cacheproxy_served_bytes_total", Help: "NAR bytes sent to clients, by source.",
		}, []string{"source"}),
		Attestations: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cacheproxy_attestations", Help: "Stored attestations.",
		}),
		AllowEntries: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cacheproxy_allowlist_entries", Help: "Allowlist entries.",
		}),
	}
	m.TimeToAttestation = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "cacheproxy_time_to_attestation_seconds",
		Help: "Time from a path's first rejection to its approval by attestation.",
		// Minutes (a rebuilder polling the queue) to weeks (a rebuild
		// nobody ran).
		Buckets: []float64{60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 2 * 86400, 4 * 86400, 7 * 86400, 14 * 86400, 28 * 86400},
	})
	m.AttestationMismatches = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cacheproxy_attestation_mismatches_total",
		Help: "attestation_mismatch decisions, by the mismatching rebuilder's classification (stable, not_reproducible, unclassified).",
	}, []string{"classification"})
	for _, c := range Classifications {
		m.AttestationMismatches.WithLabelValues(c)
	}
	rebuildQueue := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "cacheproxy_rebuild_queue_paths", Help: "Rejected paths a rebuild could approve (GET /admin/v1/rebuild-queue).",
	}, m.readRebuildQueue)
	diskFree := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "cacheproxy_disk_free_bytes", Help: "Free bytes on the state dir's file system, as downloads see it (NaN when unknown).",
	}, m.readDiskFree)
	m.reg.MustRegister(m.Decisions, m.VerifyFailures, m.HTTPRequests, m.HTTPDuration,
		m.UpstreamRequests, m.UpstreamDuration, m.CacheHits, m.CacheMisses, m.CacheSize,
		m.CacheMaxSize, m.DiskReserve, diskFree, m.Evictions, m.ScrubFailures, m.UpstreamUp, m.ServedBytes, m.Attestations, m.AllowEntries,
		m.TimeToAttestation, m.AttestationMismatches, rebuildQueue,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	// Expose every series an operator alerts on from the start, at zero,
	// so that rate() works before the first rejection.
	for _, r := range policy.Reasons {
		d := "rejected"
		if r.Approves() {
			d = "approved"
		}
		m.Decisions.WithLabelValues(d, string(r))
	}
	for _, c := range []verify.Check{verify.CheckNarHash, verify.CheckNarSize, verify.CheckFileHash,
		verify.CheckFileSize, verify.CheckDecompress, verify.CheckTruncated} {
		m.VerifyFailures.WithLabelValues(string(c))
	}
	for _, k := range []string{"narinfo", "nar"} {
		m.CacheHits.WithLabelValues(k)
		m.CacheMisses.WithLabelValues(k)
	}
	for _, s := range []string{"cache", "upstream"} {
		m.ServedBytes.WithLabelValues(s)
	}
	return m
}

// upstreamKinds and upstreamResults are the label values of the upstream
// request series, created at zero for each upstream (see UpstreamSeries).
var (
	upstreamKinds   = []string{"narinfo", "nar"}
	upstreamResults = []string{"found", "not_found", "unavailable", "mismatch", "truncated"}
)

// UpstreamSeries creates the request series of one upstream at zero, so
// that dashboards and alerts see them before its first request.
func (m *Metrics) UpstreamSeries(name string) {
	for _, k := range upstreamKinds {
		m.UpstreamDuration.WithLabelValues(name, k)
		for _, r := range upstreamResults {
			m.UpstreamRequests.WithLabelValues(name, k, r)
		}
	}
}

// SetDiskFree sets how cacheproxy_disk_free_bytes is read at each scrape
// (the blob store's free space). It may be called again, e.g. when the
// store is reopened.
func (m *Metrics) SetDiskFree(free func() (int64, error)) { m.diskFree.Store(&free) }

func (m *Metrics) readDiskFree() float64 {
	fn := m.diskFree.Load()
	if fn == nil {
		return math.NaN()
	}
	n, err := (*fn)()
	if err != nil {
		return math.NaN()
	}
	return float64(n)
}

// SetRebuildQueue sets how cacheproxy_rebuild_queue_paths is read at each
// scrape. Its cost is bounded by the rejection log's size.
func (m *Metrics) SetRebuildQueue(n func() (int, error)) { m.rebuildQueue.Store(&n) }

func (m *Metrics) readRebuildQueue() float64 {
	fn := m.rebuildQueue.Load()
	if fn == nil {
		return 0
	}
	n, err := (*fn)()
	if err != nil {
		return math.NaN()
	}
	return float64(n)
}

// Handler serves the registry in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// RegisterCluster adds the series of a cluster node (only nodes with a
// [cluster] section have them): whether a quorum of etcd is reachable and
// the revision the mirror holds, read from status at each scrape, and the
// records refused from etcd, counted by the returned function.
func (m *Metrics) RegisterCluster(status func() (connected bool, revision int64)) (rejected func(kind string)) {
	connected := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "cacheproxy_cluster_connected", Help: "1 while a quorum of the etcd cluster answers, else 0 (serving on the last mirrored state).",
	}, func() float64 {
		if ok, _ := status(); ok {
			return 1
		}
		return 0
	})
	revision := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "cacheproxy_cluster_revision", Help: "The etcd revision of the trust state this node decides from.",
	}, func() float64 {
		_, rev := status()
		return float64(rev)
	})
	refused := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cacheproxy_cluster_rejected_records_total",
		Help: "Records read from etcd and treated as absent (an attestation whose signature does not verify, an unknown key), by kind.",
	}, []string{"kind"})
	for _, k := range []string{"attestations", "audit", "other"} {
		refused.WithLabelValues(k)
	}
	m.reg.MustRegister(connected, revision, refused)
	return func(kind string) {
		if kind != "attestations" && kind != "audit" {
			kind = "other"
		}
		refused.WithLabelValues(kind).Inc()
	}
}
