package server

import (
	"fmt"
	"reflect"

	"github.com/cacheproxy/cacheproxy/internal/config"
	"github.com/cacheproxy/cacheproxy/internal/gate"
	"github.com/cacheproxy/cacheproxy/internal/policy"
	"github.com/cacheproxy/cacheproxy/internal/upstream"
)

// gateSettings are the parts of cfg the gate decides with.
func gateSettings(cfg config.Config, ups []gate.Upstream) gate.Settings {
	return gate.Settings{
		Policy: policy.Policy{
			StoreDir:         cfg.StoreDir,
			Attesters:        config.Keys(cfg.Policy.Attesters),
			Quorum:           cfg.Policy.Quorum,
			ContentAddressed: cfg.Policy.ContentAddressed,
			RequireClosure:   cfg.Policy.RequireClosure,
			Report:           cfg.Mode == config.ModeReport,
			MaxNarSize:       cfg.EffectiveMaxNarSize(),
		},
		Upstreams:   ups,
		DiskReserve: int64(cfg.Cache.MinFree),
		NegativeTTL: cfg.Cache.NegativeTTL.Duration,
	}
}

// upstreams builds a client per configured upstream, reusing the client of
// an entry in old that is configured exactly the same (it keeps its
// connections and its up/down state).
func (s *Server) upstreams(cfgs []config.Upstream, old map[string]reused) ([]gate.Upstream, error) {
	var ups []gate.Upstream
	for i, u := range cfgs {
		if r, ok := old[u.URL]; ok && sameClient(r.cfg, u) {
			ups = append(ups, gate.Upstream{Client: r.client, Keys: config.Keys(u.PublicKeys)})
			continue
		}
		var name string
		c, err := upstream.New(upstream.Options{URL: u.URL, Timeout: u.Timeout.Duration, NetrcFile: u.NetrcFile,
			UserAgent: "cacheproxy", MaxConnections: u.MaxConnections,
			OnStateChange: func(up bool) { s.upstreamState(name, up) }})
		if err != nil {
			return nil, fmt.Errorf("upstreams[%d]: %w", i, err)
		}
		name = c.Name()
		s.m.UpstreamUp.WithLabelValues(name).Set(1)
		ups = append(ups, gate.Upstream{Client: c, Keys: config.Keys(u.PublicKeys)})
	}
	return ups, nil
}

// reused is a running upstream client and the entry it was built from.
type reused struct {
	cfg    config.Upstream
	client *upstream.Client
}

// sameClient: the entries build the same client (keys are not part of it).
func sameClient(a, b config.Upstream) bool {
	return a.URL == b.URL && a.Timeout == b.Timeout && a.NetrcFile == b.NetrcFile && a.MaxConnections == b.MaxConnections
}

// ReloadResult says what a reload did.
type ReloadResult struct {
	// DecisionsChanged: the decision settings changed, so stored decisions
	// are decided again as they are requested.
	DecisionsChanged bool
	// NeedRestart names the keys that changed but only take effect at the
	// next start; their running values are kept.
	NeedRestart []string
}

// restartOnly are the keys a running server cannot change: they are
// listeners, files opened at start or the state itself.
func restartOnly(cur, next config.Config) []string {
	var keys []string
	check := func(key string, a, b any) {
		if !reflect.DeepEqual(a, b) {
			keys = append(keys, key)
		}
	}
	check("listen", cur.Listen, next.Listen)
	check("state_dir", cur.StateDir, next.StateDir)
	check("store_dir", cur.StoreDir, next.StoreDir)
	check("priority", cur.Priority, next.Priority)
	check("signing_key_file", cur.SigningKeyFile, next.SigningKeyFile)
	check("shutdown_timeout", cur.ShutdownTimeout, next.ShutdownTimeout)
	check("serve_compression", cur.ServeCompression, next.ServeCompression)
	check("cache.max_size", cur.Cache.MaxSize, next.Cache.MaxSize)
	check("cache.scrub_period", cur.Cache.ScrubPeriod, next.Cache.ScrubPeriod)
	check("admin", cur.Admin, next.Admin)
	check("cluster", cur.Cluster, next.Cluster)
	return keys
}

// Reload applies a new, validated configuration while serving: policy,
// mode, attesters, upstreams and their keys, cache.max_nar_size,
// cache.min_free and cache.negative_ttl take effect at once, for requests
// that start from now on. Only the stored decisions the change affects are
// dropped: none when no decision setting changed, otherwise each is decided
// again from its stored narinfo when next requested. The keys in
// ReloadResult.NeedRestart keep their running values. On error nothing
// changed and the running configuration keeps serving. Reloads must not
// run concurrently.
func (s *Server) Reload(next config.Config) (ReloadResult, error) {
	res := ReloadResult{NeedRestart: restartOnly(s.cfg, next)}
	next.StoreDir = s.cfg.StoreDir // reported above; the gate keeps its own
	old := map[string]reused{}
	for _, u := range s.running {
		old[u.cfg.URL] = u
	}
	ups, err := s.upstreams(next.Upstreams, old)
	if err != nil {
		return res, err
	}
	if res.DecisionsChanged, err = s.gate.Reconfigure(gateSettings(next, ups)); err != nil {
		return res, err
	}
	if s.node != nil && !reflect.DeepEqual(s.cfg.Policy.Attesters, next.Policy.Attesters) {
		// Records refused under the old keys may verify now, and records
		// by a key no longer configured must go.
		s.node.Resync()
	}
	kept := map[*upstream.Client]bool{}
	s.running = s.running[:0]
	for i, u := range ups {
		kept[u.Client] = true
		s.running = append(s.running, reused{cfg: next.Upstreams[i], client: u.Client})
	}
	for _, r := range old {
		if !kept[r.client] {
			// Downloads in progress keep their connections; idle ones go.
			r.client.CloseIdleConnections()
			if !s.serving(r.client.Name()) {
				s.m.UpstreamUp.DeleteLabelValues(r.client.Name())
			}
		}
	}
	return res, nil
}

// serving reports whether an upstream of this name is configured now.
func (s *Server) serving(name string) bool {
	for _, r := range s.running {
		if r.client.Name() == name {
			return true
		}
	}
	return false
}
