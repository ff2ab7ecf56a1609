package server

import (
	"html"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/config"
)

// statusScenario is a proxy with some of every kind of decision made, and
// the things the status page must never show.
type statusScenario struct {
	f *fixture
	// secrets must not appear on the page: the admin token, operators'
	// reasons, file system paths.
	secrets                                    []string
	hello, openssl, denied, allowed, localOnly *storeObj
	fileDir                                    string
}

// newStatusScenario starts a proxy with three upstreams (the fake one, a
// file:// one, and one that fails until it is marked down) and makes:
// one attested approval (NAR fetched twice: a miss, then a hit), one
// allowlisted approval, one denied path, an unattested path asked for
// twice, and an unattested path found only in the file:// upstream.
func newStatusScenario(t *testing.T) *statusScenario {
	t.Helper()
	up, failing := newFakeUpstream(t, "upstream-1"), newFakeUpstream(t, "upstream-2")
	fileDir := filepath.Join(t.TempDir(), "private-file-cache")
	if err := os.MkdirAll(fileDir, 0o755); err != nil {
		t.Fatal(err)
	}
	withFileAndFailing := func(c *config.Config) {
		c.Upstreams = append(c.Upstreams,
			config.Upstream{URL: "file://" + fileDir, PublicKeys: []config.PublicKey{config.Key(up.key.Public())}},
			config.Upstream{URL: failing.srv.URL, PublicKeys: []config.PublicKey{config.Key(failing.key.Public())}})
	}
	f := newFixtureWith(t, []*fakeUpstream{up}, withFileAndFailing)
	sc := &statusScenario{f: f, fileDir: fileDir}

	obj := func(name string, seed int64) *storeObj {
		o := newObj(t, name, dirNAR(t, seed, 300), "zstd")
		o.ni.Deriver = storeHash(name+".drv") + "-" + name + ".drv"
		return o
	}
	sc.hello = obj("hello-2.12", 1)
	sc.openssl = obj("openssl-3.0.7", 2)
	sc.denied = obj("denied-tool-1.0", 3)
	sc.allowed = obj("bootstrap-tools-1.0", 4)
	sc.localOnly = obj("local-only-1.0", 5)
	for _, o := range []*storeObj{sc.hello, sc.openssl, sc.denied, sc.allowed} {
		up.publish(o)
	}
	if err := os.WriteFile(filepath.Join(fileDir, sc.localOnly.hash+".narinfo"), sc.localOnly.signed(up.key), 0o644); err != nil {
		t.Fatal(err)
	}

	f.attest(sc.hello)
	denyReason, allowReason := "SECRET-DENY-REASON-CVE", "SECRET-ALLOW-REASON-JIRA"
	if code, body := f.admin("POST", adminapi.PathDenylist, jsonBody(map[string]any{
		"patterns": []string{"*-denied-tool-*"}, "reason": denyReason})); code != 200 {
		t.Fatalf("deny: %d %s", code, body)
	}
	if code, body := f.admin("POST", adminapi.PathAllowlist, jsonBody(map[string]any{
		"paths": []string{sc.allowed.storePath}, "reason": allowReason})); code != 200 {
		t.Fatalf("allow: %d %s", code, body)
	}

	nar := f.narURL(sc.hello) // attested
	for range 2 {
		if resp, _ := f.mustGet(nar); resp.StatusCode != 200 {
			t.Fatalf("NAR: %d", resp.StatusCode)
		}
	}
	f.expectDecision(sc.allowed, 200, "approved; reason=allowlisted")
	f.expectDecision(sc.denied, 404, "rejected; reason=denied")
	f.expectDecision(sc.openssl, 404, "rejected; reason=unattested")
	f.expectDecision(sc.openssl, 404, "rejected; reason=unattested")
	f.expectDecision(sc.localOnly, 404, "rejected; reason=unattested")

	// The third upstream fails three times in a row: marked down.
	missing := storeHash("missing-1.0")
	failing.handle("/"+missing+".narinfo", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "broken", http.StatusInternalServerError)
	})
	for range 3 {
		if resp, _ := f.mustGet("/" + missing + ".narinfo"); resp.StatusCode != http.StatusServiceUnavailable {
			t.Fatalf("narinfo with a failing upstream: %d, want 503", resp.StatusCode)
		}
	}
	sc.secrets = []string{f.token, f.cfg.StateDir, fileDir, "private-file-cache", denyReason, allowReason}
	return sc
}

// rowCells returns the text of each cell of the table row whose opening
// tag matches attr (e.g. `data-reason="unattested"`), or nil.
func rowCells(page, attr string) []string {
	row := regexp.MustCompile(`(?s)<tr[^>]*` + regexp.QuoteMeta(attr) + `[^>]*>(.*?)</tr>`).FindStringSubmatch(page)
	if row == nil {
		return nil
	}
	var cells []string
	for _, c := range regexp.MustCompile(`(?s)<t[dh][^>]*>(.*?)</t[dh]>`).FindAllStringSubmatch(row[1], -1) {
		cells = append(cells, strings.TrimSpace(regexp.MustCompile(`<[^>]+>`).ReplaceAllString(c[1], "")))
	}
	return cells
}

// checkStatusPage asserts what the page shows after newStatusScenario; page
// is the served HTML or the DOM a browser built from it.
func (sc *statusScenario) checkStatusPage(t *testing.T, page string) {
	t.Helper()
	page = html.UnescapeString(page) // html/template writes "+" as "&#43;"
	for reason, want := range map[string]string{
		"attested": "approved 1 1", "allowlisted": "approved 1 1", "denied": "rejected 1 1",
		"unattested": "rejected 3 3", "attestation_mismatch": "rejected 0 0", "content_addressed": "approved 0 0",
	} {
		cells := rowCells(page, `data-reason="`+reason+`"`)
		if got := strings.Join(cells[1:], " "); len(cells) < 4 || got != want {
			t.Errorf("decisions row %s: %q, want %q", reason, cells, want)
		}
	}
	if got := strings.Join(rowCells(page, `data-total="approved"`), " "); got != "all approved  2 2" {
		t.Errorf("approved total: %q", got)
	}
	if got := strings.Join(rowCells(page, `data-total="rejected"`), " "); got != "all rejected  4 4" {
		t.Errorf("rejected total: %q", got)
	}
	if got := rowCells(page, `data-kind="nar"`); len(got) != 3 || got[1] != "50.0% (1 of 2)" || got[2] != got[1] {
		t.Errorf("NAR hit ratio row: %q, want 50.0%% (1 of 2) in both windows", got)
	}

	// Latest rejections: newest first, with reason, deriver and upstream.
	sec := section(t, page, "rejections")
	for _, want := range [][]string{
		{sc.localOnly.storePath, "unattested", storeDir + "/" + sc.localOnly.ni.Deriver, "upstreams[1] (local directory)", "1"},
		{sc.openssl.storePath, "unattested", storeDir + "/" + sc.openssl.ni.Deriver, sc.f.up.srv.URL, "1"},
		{sc.denied.storePath, "denied", storeDir + "/" + sc.denied.ni.Deriver, sc.f.up.srv.URL, "1"},
	} {
		if !strings.Contains(sec, strings.Join(want, "|")) {
			t.Errorf("rejections lack %q:\n%s", want, sec)
		}
	}
	if strings.Index(sec, sc.localOnly.storePath) > strings.Index(sec, sc.denied.storePath) {
		t.Errorf("rejections not newest first:\n%s", sec)
	}
	if strings.Contains(sec, sc.hello.storePath) || strings.Contains(sec, sc.allowed.storePath) {
		t.Errorf("approved paths listed as rejections:\n%s", sec)
	}

	ups := section(t, page, "upstreams")
	for _, want := range []string{sc.f.up.srv.URL + "|up", "upstreams[1] (local directory)|up", "|down"} {
		if !strings.Contains(ups, want) {
			t.Errorf("upstreams lack %q:\n%s", want, ups)
		}
	}
	if strings.Count(ups, "|down") != 1 {
		t.Errorf("exactly the failing upstream should be down:\n%s", ups)
	}

	att := rowCells(page, `data-key="rebuilder-1"`)
	if len(att) != 3 || att[0] != sc.f.rebuilder.Public().String() || att[1] != "1" || att[2] != "yes" {
		t.Errorf("attester row: %q", att)
	}
	if !strings.Contains(page, sc.f.s.PublicKey().String()) {
		t.Error("the gatekeeper public key is not shown")
	}
	for _, s := range sc.secrets {
		if strings.Contains(page, s) {
			t.Errorf("the status page shows %q", s)
		}
	}
}

// section returns the rows of <section id=id>, one line per row with the
// cell texts joined by "|".
func section(t *testing.T, page, id string) string {
	t.Helper()
	m := regexp.MustCompile(`(?s)<section id="` + id + `">(.*?)</section>`).FindStringSubmatch(page)
	if m == nil {
		t.Fatalf("no section %s in the page", id)
	}
	var lines []string
	for _, row := range regexp.MustCompile(`(?s)<tr[^>]*>.*?</tr>`).FindAllString(m[1], -1) {
		lines = append(lines, strings.Join(rowCells(row, ""), "|"))
	}
	return strings.Join(lines, "\n")
}

func TestStatusPage(t *testing.T) {
	sc := newStatusScenario(t)
	resp, body := sc.f.mustGet("/")
	if resp.StatusCode != 200 {
		t.Fatalf("GET /: %d %s", resp.StatusCode, body)
	}
	for h, want := range map[string]string{
		"Content-Type":            "text/html; charset=utf-8",
		"Cache-Control":           "no-store",
		"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
	} {
		if got := resp.Header.Get(h); got != want {
			t.Errorf("%s: %q, want %q", h, got, want)
		}
	}
	page := string(body)
	if !strings.Contains(page, `<meta name="viewport" content="width=device-width, initial-scale=1">`) {
		t.Error("no viewport meta: unreadable on a phone")
	}
	// No external asset, no script: everything is in the one response.
	for _, bad := range []string{"<script", "<link", "src=", "http-equiv", "@import", "url("} {
		if strings.Contains(page, bad) {
			t.Errorf("the page contains %q", bad)
		}
	}
	sc.checkStatusPage(t, page)
	if got := sc.f.metric("cacheproxy_http_requests_total", `code="200",handler="status"`); got != 1 {
		t.Errorf("status requests counted: %v", got)
	}
}

// A fresh proxy shows an empty page, not an error, and escapes what it
// shows.
func TestStatusPageEmpty(t *testing.T) {
	f := newFixture(t)
	resp, body := f.mustGet("/")
	if resp.StatusCode != 200 {
		t.Fatalf("GET /: %d %s", resp.StatusCode, body)
	}
	page := string(body)
	if !strings.Contains(page, `id="no-rejections"`) {
		t.Error("an empty rejection log is not said")
	}
	if got := rowCells(page, `data-kind="nar"`); len(got) != 3 || got[1] != "no lookups" {
		t.Errorf("NAR hit ratio on a fresh proxy: %q", got)
	}
	if cells := rowCells(page, `data-reason="unattested"`); strings.Join(cells, " ") != "unattested rejected 0 0" {
		t.Errorf("unattested row on a fresh proxy: %q", cells)
	}
	if !strings.Contains(page, "started, less than a minute ago, so a column covers at most that.") {
		t.Error("the page does not say that its counts began with the process")
	}
	if resp, _ := f.mustGet("/index.html"); resp.StatusCode != 404 {
		t.Errorf("/index.html: %d, want 404", resp.StatusCode)
	}
}

func TestStatusFormats(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 1536: "1.5 KiB", 100 << 30: "100.0 GiB", 3 << 40: "3.0 TiB"} {
		if got := formatBytes(n); got != want {
			t.Errorf("formatBytes(%d) = %q, want %q", n, got, want)
		}
	}
	for d, want := range map[time.Duration]string{30 * time.Second: "less than a minute", 12 * time.Minute: "12m",
		time.Hour: "1h", 200 * time.Minute: "3h 20m", 26 * time.Hour: "1d 2h"} {
		if got := formatDuration(d); got != want {
			t.Errorf("formatDuration(%v) = %q, want %q", d, got, want)
		}
	}
}
