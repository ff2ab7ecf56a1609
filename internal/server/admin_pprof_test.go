package server

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// Profiles are on the admin API, behind its token, and nowhere on the main
// listener.
func TestProfilesOnlyOnAdminWithToken(t *testing.T) {
	f := newFixture(t)

	code, body := f.admin("GET", "/debug/pprof/heap?debug=1", "")
	if code != http.StatusOK || !strings.Contains(body, "heap profile") {
		t.Fatalf("admin heap profile with token: %d %.200s", code, body)
	}
	code, body = f.admin("GET", "/debug/pprof/", "")
	if code != http.StatusOK || !strings.Contains(body, "goroutine") {
		t.Fatalf("admin profile index with token: %d %.200s", code, body)
	}

	req := httptest.NewRequest("GET", "/debug/pprof/heap", nil)
	rec := httptest.NewRecorder()
	f.s.AdminHandler().ServeHTTP(rec, req)
	if rec.Code != http.StatusUnauthorized {
		t.Fatalf("admin heap profile without token: %d, want 401", rec.Code)
	}

	for _, p := range []string{"/debug/pprof/", "/debug/pprof/heap", "/debug/pprof/profile?seconds=1"} {
		resp, body := f.mustGet(p)
		if resp.StatusCode != http.StatusNotFound {
			t.Fatalf("main listener %s: %d %.200s, want 404", p, resp.StatusCode, body)
		}
	}
}
