// Package contrib checks the operator files in this directory: the
// Prometheus alerting rules (promtool) and the Grafana dashboard, that
// every metric and label value they use exists on /metrics of a running
// proxy, and the rebuilder's systemd unit (systemd-analyze verify).
package contrib

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/cacheproxy/cacheproxy/internal/etcdtest"

	"github.com/cacheproxy/cacheproxy/internal/config"
	"github.com/cacheproxy/cacheproxy/internal/server"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

const (
	alertsFile     = "prometheus/alerts.yml"
	alertTestsFile = "prometheus/alerts_test.yml"
	dashboardFile  = "grafana/cacheproxy.json"
)

// promtool returns Debian's promtool (package prometheus), skipping the
// test without it unless CI is set.
func promtool(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("promtool")
	if err == nil {
		return p
	}
	if os.Getenv("CI") != "" {
		t.Fatal("promtool is not on PATH (apt-get install prometheus); CI is set, refusing to skip")
	}
	t.Skip("SKIP: promtool is not on PATH (apt-get install prometheus)")
	return ""
}

func run(t *testing.T, dir, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, out)
	}
}

func TestAlertRules(t *testing.T) {
	bin := promtool(t)
	run(t, ".", bin, "check", "rules", alertsFile)
	// The unit tests name alerts.yml relative to themselves.
	run(t, filepath.Dir(alertTestsFile), bin, "test", "rules", filepath.Base(alertTestsFile))
}

// dashboard is the part of Grafana's dashboard model the test checks.
type dashboard struct {
	Title, UID    string
	SchemaVersion int
	Templating    struct {
		List []struct {
			Name, Type string
			Query      any
			Datasource *datasource
		}
	}
	Panels []panel
}

type datasource struct{ Type, UID string }

type panel struct {
	ID         int
	Type       string
	Title      string
	Datasource *datasource
	GridPos    struct{ H, W, X, Y int }
	Targets    []struct {
		RefID      string `json:"refId"`
		Expr       string
		Datasource *datasource
	}
}

func loadDashboard(t *testing.T) dashboard {
	t.Helper()
	raw, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	dec := json.NewDecoder(bytes.NewReader(raw))
	if err := dec.Decode(&d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	return d
}

// The dashboard is a valid Grafana model: a datasource variable that every
// panel and query uses, unique panel ids, panels that do not overlap, and
// queries that are valid PromQL (checked by promtool as recording rules).
func TestDashboard(t *testing.T) {
	d := loadDashboard(t)
	if d.Title == "" || d.UID == "" || d.SchemaVersion < 30 {
		t.Errorf("title %q, uid %q, schemaVersion %d", d.Title, d.UID, d.SchemaVersion)
	}
	hasDS := false
	for _, v := range d.Templating.List {
		if v.Name == "datasource" && v.Type == "datasource" && v.Query == "prometheus" {
			hasDS = true
		}
	}
	if !hasDS {
		t.Error("no datasource variable of type prometheus")
	}
	ids := map[int]bool{}
	var rules strings.Builder
	rules.WriteString("groups:\n  - name: dashboard\n    rules:\n")
	occupied := map[[2]int]int{}
	for _, p := range d.Panels {
		if ids[p.ID] {
			t.Errorf("panel id %d used twice", p.ID)
		}
		ids[p.ID] = true
		g := p.GridPos
		if g.W <= 0 || g.H <= 0 || g.X+g.W > 24 {
			t.Errorf("panel %q: gridPos %+v", p.Title, g)
		}
		for x := g.X; x < g.X+g.W; x++ {
			for y := g.Y; y < g.Y+g.H; y++ {
				if other, ok := occupied[[2]int{x, y}]; ok {
					t.Fatalf("panel %q overlaps panel %d at %d,%d", p.Title, other, x, y)
				}
				occupied[[2]int{x, y}] = p.ID
			}
		}
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
			t.Errorf("panel %q does not use the datasource variable: %+v", p.Title, p.Datasource)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, q := range p.Targets {
			if q.Datasource == nil || q.Datasource.UID != "${datasource}" || q.Expr == "" {
				t.Errorf("panel %q query %s: datasource %+v, expr %q", p.Title, q.RefID, q.Datasource, q.Expr)
			}
			fmt.Fprintf(&rules, "      - record: dashboard:panel_%d_%s\n        expr: %q\n", p.ID, q.RefID, promQL(q.Expr))
		}
	}
	bin := promtool(t)
	file := filepath.Join(t.TempDir(), "dashboard-rules.yml")
	if err := os.WriteFile(file, []byte(rules.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, ".", bin, "check", "rules", file)
}

// promQL replaces Grafana's variables with values Prometheus accepts.
func promQL(expr string) string {
	return strings.NewReplacer("$__rate_interval", "5m", "$__range", "1d", "$__interval", "1m",
		"$instance", ".*").Replace(expr)
}

// startProxy runs a proxy on loopback in front of an upstream that has
// nothing, and returns its base URL.
func startProxy(t *testing.T) string {
	t.Helper()
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/nix-cache-info" {
			io.WriteString(w, "StoreDir: /nix/store\n")
			return
		}
		http.NotFound(w, r)
	}))
	t.Cleanup(up.Close)
	key, err := verify.GenerateKey("upstream-1")
	if err != nil {
		t.Fatal(err)
	}
	cfg := config.Defaults(config.Env{})
	cfg.StateDir = t.TempDir()
	cfg.Admin.Listen = ""
	u := cfg.Upstreams[0] // the defaults, for another cache
	u.URL, u.PublicKeys = up.URL, []config.PublicKey{config.Key(key.Public())}
	cfg.Upstreams = []config.Upstream{u}
	// A cluster node has every series a single node has, and the
	// cluster's (the alerts on those are for cluster nodes only).
	cfg.Cluster.Etcd = etcdtest.Start(t, 1).Endpoints()
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	s, err := server.New(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Serve(ctx, l, nil); close(done) }()
	t.Cleanup(func() {
		cancel()
		<-done
		if err := s.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return "http://" + l.Addr().String()
}

func get(t *testing.T, url string) []byte {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return body
}

// series is a scrape: metric name -> the label sets of its samples.
type series map[string][]map[string]string

var (
	sampleLine = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? `)
	labelPair  = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"`)
	// A metric used in PromQL, with its label matchers when it has any.
	usedMetric = regexp.MustCompile(`\b(cacheproxy_[a-z0-9_]+)(?:\{([^}]*)\})?`)
	matcher    = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"`)
)

func scrape(t *testing.T, base string) series {
	t.Helper()
	out := series{}
	sc := bufio.NewScanner(bytes.NewReader(get(t, base+"/metrics")))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		m := sampleLine.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		labels := map[string]string{}
		for _, p := range labelPair.FindAllStringSubmatch(m[2], -1) {
			labels[p[1]] = p[2]
		}
		out[m[1]] = append(out[m[1]], labels)
	}
	return out
}

// queries returns the PromQL of the alert rules and the dashboard.
func queries(t *testing.T) map[string]string {
	t.Helper()
	out := map[string]string{}
	raw, err := os.ReadFile(alertsFile)
	if err != nil {
		t.Fatal(err)
	}
	// Every line of alerts.yml: exprs, and metric names in annotations too.
	for i, line := range strings.Split(string(raw), "\n") {
		if !strings.HasPrefix(strings.TrimSpace(line), "#") {
			out[fmt.Sprintf("%s:%d", alertsFile, i+1)] = line
		}
	}
	for _, p := range loadDashboard(t).Panels {
		for _, q := range p.Targets {
			out[fmt.Sprintf("%s panel %q %s", dashboardFile, p.Title, q.RefID)] = q.Expr
		}
	}
	return out
}

// Every metric the alerts and the dashboard use exists on /metrics of a
// running proxy, with every label value they select on, from the start
// (before any decision, failure or upstream request).
func TestMetricsExist(t *testing.T) {
	base := startProxy(t)
	get(t, base+"/nix-cache-info") // the http_* series exist after one request
	got := scrape(t, base)

	where := queries(t)
	keys := make([]string, 0, len(where))
	for k := range where {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	used := 0
	for _, k := range keys {
		for _, m := range usedMetric.FindAllStringSubmatch(where[k], -1) {
			used++
			name := m[1]
			samples, ok := got[name]
			if !ok {
				t.Errorf("%s: %s is not on /metrics", k, name)
				continue
			}
			for _, mm := range matcher.FindAllStringSubmatch(m[2], -1) {
				label, op, value := mm[1], mm[2], mm[3]
				if label == "instance" || label == "job" || label == "le" {
					continue // added by Prometheus, or histogram buckets
				}
				if !hasLabel(samples, label, op, value) {
					t.Errorf("%s: no series %s{%s%s%q} on /metrics", k, name, label, op, value)
				}
			}
		}
	}
	if used < 20 {
		t.Errorf("only %d metric uses found in the alerts and the dashboard: is the extraction broken?", used)
	}
}

// hasLabel says whether some sample carries label with a value the matcher
// selects (for = and !=: exactly; for regex matchers: the label exists).
func hasLabel(samples []map[string]string, label, op, value string) bool {
	for _, s := range samples {
		v, ok := s[label]
		switch {
		case !ok:
		case op == "=" && v == value, op == "!=" && v != value, op == "=~", op == "!~":
			return true
		}
	}
	return false
}

const rebuilderUnit = "rebuilder/cacheproxy-rebuild.service"

// The rebuilder's example unit verifies (systemd-analyze, with ExecStart
// pointing at an executable that exists here), runs the long-running mode
// next to the Nix daemon, and keeps what the README says it keeps: the
// daemon's /tmp reachable (its kept build directories are removed from
// there) and the rest taken away.
func TestRebuilderUnit(t *testing.T) {
	raw, err := os.ReadFile(rebuilderUnit)
	if err != nil {
		t.Fatal(err)
	}
	lines := map[string]bool{}
	for _, l := range strings.Split(string(raw), "\n") {
		lines[strings.TrimSpace(l)] = true
	}
	for _, want := range []string{
		"ExecStart=/usr/local/bin/cacheproxy rebuild -c /etc/cacheproxy/rebuild.toml --key-file=%d/rebuilder-key --token-file=%d/admin-token",
		"Requires=nix-daemon.socket", "Environment=NIX_REMOTE=daemon", "PrivateTmp=no", "ReadWritePaths=/tmp",
		"ProtectSystem=strict", "ProtectHome=yes", "NoNewPrivileges=yes", "CapabilityBoundingSet=CAP_DAC_OVERRIDE CAP_FOWNER",
		"RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "StateDirectory=cacheproxy-rebuild",
	} {
		if !lines[want] {
			t.Errorf("%s lacks %q", rebuilderUnit, want)
		}
	}
	if strings.Contains(string(raw), "--once") {
		t.Errorf("%s runs --once; the service is the long-running mode", rebuilderUnit)
	}
	tool, err := exec.LookPath("systemd-analyze")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("systemd-analyze is not on PATH (CI is set, refusing to skip)")
		}
		t.Skip("SKIP: systemd-analyze is not on PATH (apt-get install systemd)")
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	unit := filepath.Join(t.TempDir(), filepath.Base(rebuilderUnit))
	if err := os.WriteFile(unit, []byte(strings.ReplaceAll(string(raw), "/usr/local/bin/cacheproxy", exe)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(tool, "verify", unit).CombinedOutput()
	if err != nil || strings.Contains(string(out), filepath.Base(rebuilderUnit)) {
		t.Fatalf("systemd-analyze verify %s: %v\n%s", rebuilderUnit, err, out)
	}
	// The README records the exposure score; a change must update it.
	out, err = exec.Command(tool, "security", "--offline=true", "--no-pager", unit).CombinedOutput()
	if err != nil && strings.Contains(string(out), "--offline") {
		t.Skipf("SKIP: this systemd-analyze has no security --offline: %s", out)
	}
	m := regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+)`).FindStringSubmatch(string(out))
	if m == nil {
		t.Fatalf("systemd-analyze security printed no exposure level (%v):\n%s", err, out)
	}
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	if flat := strings.Join(strings.Fields(string(readme)), " "); !strings.Contains(flat, "exposure level "+m[1]+" OK**, the price of root;") {
		t.Errorf("systemd-analyze security scores %s %s, which README.md does not record", rebuilderUnit, m[1])
	}
}
