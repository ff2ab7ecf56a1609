package server

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
)

func (s *Server) handleCacheInfo(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/x-nix-cache-info")
	fmt.Fprintf(w, "StoreDir: %s\nWantMassQuery: 1\nPriority: %d\n", s.cfg.StoreDir, s.cfg.Priority)
}

// healthCheck is one thing /healthz looks at: "" when fine, else why not.
type healthCheck struct {
	name string
	fn   func() string
}

func (s *Server) healthChecks() []healthCheck {
	return []healthCheck{
		{"state_file", s.checkStateFile},
		{"state_writable", func() string {
			if err := s.db.Writable(); err != nil {
				return "state store not writable: " + err.Error()
			}
			return ""
		}},
		{"disk_reserve", s.checkDiskReserve},
		{"upstreams", func() string { return s.gate.UpstreamsDown() }},
	}
}

// checkStateFile catches a state file deleted or replaced behind the
// server's back: bbolt keeps writing to its open inode, so writes still
// succeed, but nothing of them would survive a restart.
func (s *Server) checkStateFile() string {
	path := filepath.Join(s.cfg.StateDir, "state.db")
	st, err := os.Stat(path)
	if err != nil {
		return "state file " + path + " is gone"
	}
	if !os.SameFile(st, s.db.FileInfo()) {
		return "state file " + path + " was replaced"
	}
	return ""
}

// checkDiskReserve fails when the state dir's file system has less free
// space than the reserve: new downloads are refused then.
func (s *Server) checkDiskReserve() string {
	if err := s.gate.DiskRoom(); err != nil {
		return err.Error()
	}
	return ""
}

// handleHealthz answers 200 when every check passes, else 503 with the
// reasons; ?verbose lists each check.
func (s *Server) handleHealthz(w http.ResponseWriter, r *http.Request) {
	var failed, lines []string
	switch {
	case s.node != nil && !s.node.Ready():
		// Nothing to decide from yet: not ready for traffic.
		why := "the trust state was never read from etcd yet"
		failed = append(failed, "cluster: "+why)
		lines = append(lines, "cluster: FAIL "+why+" ("+s.clusterHealth()+")")
	case s.node != nil:
		// Reported, never failed: see clusterHealth.
		lines = append(lines, "cluster: "+s.clusterHealth())
	}
	for _, c := range s.healthChecks() {
		if why := c.fn(); why != "" {
			failed = append(failed, c.name+": "+why)
			lines = append(lines, c.name+": FAIL "+why)
		} else {
			lines = append(lines, c.name+": ok")
		}
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if len(failed) > 0 {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	if _, verbose := r.URL.Query()["verbose"]; verbose {
		fmt.Fprintln(w, strings.Join(lines, "\n"))
		return
	}
	if len(failed) > 0 {
		fmt.Fprintln(w, strings.Join(failed, "\n"))
		return
	}
	fmt.Fprintln(w, "ok")
	if s.node != nil && !s.node.Status().Connected {
		fmt.Fprintln(w, "cluster: "+s.clusterHealth())
	}
}
