package server

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/cacheproxy/cacheproxy/internal/policy"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// metrics are the collectors named in the README, on a registry of the
// server's own (no global registry, so tests can run several servers).
type metrics struct {
	reg *prometheus.Registry

	decisions        *prometheus.CounterVec
	verifyFailures   *prometheus.CounterVec
	httpRequests     *prometheus.CounterVec
	httpDuration     *prometheus.HistogramVec
	upstreamRequests *prometheus.CounterVec
	upstreamDuration *prometheus.HistogramVec
	cacheHits        *prometheus.CounterVec
	cacheMisses      *prometheus.CounterVec
	cacheSize        prometheus.Gauge
	evictions        prometheus.Counter
	servedBytes      *prometheus.CounterVec
	attestations     prometheus.Gauge
	allowEntries     prometheus.Gauge
}

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cacheproxy_decisions_total", Help: "Decisions made about store paths, by outcome and reason.",
		}, []string{"decision", "reason"}),
		verifyFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cacheproxy_nar_verification_failures_total", Help: "NAR transfers that failed verification, by failed check.",
		}, []string{"check"}),
		httpRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cacheproxy_http_requests_total", Help: "HTTP requests served, by handler and status code.",
		}, []string{"handler", "code"}),
		httpDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "cacheproxy_http_request_duration_seconds", Help: "HTTP request latency by handler.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10),
		}, []string{"handler"}),
		upstreamRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cacheproxy_upstream_requests_total", Help: "Requests to upstream caches, by upstream, kind and result.",
		}, []string{"upstream", "kind", "result"}),
		upstreamDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "cacheproxy_upstream_request_duration_seconds", Help: "Upstream request latency (narinfo: whole; nar: whole transfer).",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 10),
		}, []string{"upstream", "kind"}),
		cacheHits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cacheproxy_cache_hits_total", Help: "Requests answered from the local cache, by kind.",
		}, []string{"kind"}),
		cacheMisses: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cacheproxy_cache_misses_total", Help: "Requests that had to go upstream, by kind.",
		}, []string{"kind"}),
		cacheSize: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cacheproxy_cache_size_bytes", Help: "Bytes of verified NAR blobs on disk.",
		}),
		evictions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cacheproxy_cache_evictions_total", Help: "Blobs evicted to stay within cache.max_size.",
		}),
		servedBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cacheproxy_served_bytes_total", Help: "NAR bytes sent to clients, by source.",
		}, []string{"source"}),
		attestations: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cacheproxy_attestations", Help: "Stored attestations.",
		}),
		allowEntries: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cacheproxy_allowlist_entries", Help: "Allowlist entries.",
		}),
	}
	m.reg.MustRegister(m.decisions, m.verifyFailures, m.httpRequests, m.httpDuration,
		m.upstreamRequests, m.upstreamDuration, m.cacheHits, m.cacheMisses, m.cacheSize,
		m.evictions, m.servedBytes, m.attestations, m.allowEntries,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	// Expose every series an operator alerts on from the start, at zero,
	// so that rate() works before the first rejection.
	for _, r := range policy.Reasons {
		d := "rejected"
		if r == policy.Attested || r == policy.Allowlisted || r == policy.ContentAddressed {
			d = "approved"
		}
		m.decisions.WithLabelValues(d, string(r))
	}
	for _, c := range []verify.Check{verify.CheckNarHash, verify.CheckNarSize, verify.CheckFileHash,
		verify.CheckFileSize, verify.CheckDecompress, verify.CheckTruncated} {
		m.verifyFailures.WithLabelValues(string(c))
	}
	for _, k := range []string{"narinfo", "nar"} {
		m.cacheHits.WithLabelValues(k)
		m.cacheMisses.WithLabelValues(k)
	}
	for _, s := range []string{"cache", "upstream"} {
		m.servedBytes.WithLabelValues(s)
	}
	return m
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}
