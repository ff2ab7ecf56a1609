package server

import (
	"bytes"
	_ "embed"
	"fmt"
	"html/template"
	"net/http"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/cluster"

	"github.com/cacheproxy/cacheproxy/internal/gate"
)

// The status page at / on the main listener: one server-rendered HTML page,
// no script, no external asset, readable on a phone. What it may show is
// decided by gate.Overview (nothing an unauthenticated fleet machine should
// not see); this file only renders it.

//go:embed templates/status.html
var statusHTML string

var statusTemplate = template.Must(template.New("status").Funcs(template.FuncMap{
	"bytes":    formatBytes,
	"percent":  func(f float64) string { return fmt.Sprintf("%.1f%%", 100*f) },
	"ratio":    func(a, b int64) float64 { return float64(a) / float64(b) },
	"duration": formatDuration,
	"time":     func(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05Z") },
	"hitratio": func(w gate.OverviewWindow, kind string) string {
		if r, ok := w.HitRatio(kind); ok {
			return fmt.Sprintf("%.1f%% (%d of %d)", 100*r, w.Hits[kind], w.Hits[kind]+w.Misses[kind])
		}
		return "no lookups"
	},
	"nonzero": func(ns []uint64) bool {
		for _, n := range ns {
			if n > 0 {
				return true
			}
		}
		return false
	},
}).Parse(statusHTML))

// statusPage is what the status page shows: the gate's overview and, on a
// cluster node, how it stands with etcd.
type statusPage struct {
	gate.Overview
	Cluster *cluster.Status
}

func (s *Server) handleStatus(w http.ResponseWriter, r *http.Request) {
	ov, err := s.gate.Overview()
	if err != nil {
		s.internalError(w, "status page", err)
		return
	}
	page := statusPage{Overview: ov}
	if s.node != nil {
		st := s.node.Status()
		page.Cluster = &st
	}
	var buf bytes.Buffer
	if err := statusTemplate.Execute(&buf, page); err != nil {
		s.internalError(w, "render status page", err)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	// Inline CSS is all the page has: no script, no frame, no fetch.
	h.Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'")
	w.Write(buf.Bytes())
}

// formatBytes writes a size in binary units, as the configuration takes them.
func formatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTP"[exp])
}

// formatDuration is a span in the largest whole units: "1d 2h", "3h 20m", "12m".
func formatDuration(d time.Duration) string {
	if d < time.Minute {
		return "less than a minute"
	}
	d = d.Round(time.Minute)
	if days := int(d.Hours()) / 24; days > 0 {
		return fmt.Sprintf("%dd %dh", days, int(d.Hours())%24)
	}
	h, m := int(d.Hours()), int(d.Minutes())%60
	switch {
	case h > 0 && m > 0:
		return fmt.Sprintf("%dh %dm", h, m)
	case h > 0:
		return fmt.Sprintf("%dh", h)
	}
	return fmt.Sprintf("%dm", m)
}
