package upstream

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// netrcFor writes a netrc file giving credentials for 127.0.0.1.
func netrcFor(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "netrc")
	if err := os.WriteFile(p, []byte("machine 127.0.0.1 login alice password s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestRedirectSameOrigin(t *testing.T) {
	auth := make(chan string, 10)
	srv, hits := server(t, nil, func(w http.ResponseWriter, r *http.Request) {
		p := r.URL.Path
		switch {
		case p == "/old/x.narinfo":
			http.Redirect(w, r, "/new/x.narinfo", http.StatusFound)
		case p == "/absolute/x.narinfo": // same origin, spelled out
			http.Redirect(w, r, "http://"+r.Host+"/new/x.narinfo", http.StatusMovedPermanently)
		case p == "/new/x.narinfo":
			auth <- r.Header.Get("Authorization")
			io.WriteString(w, "StorePath: /nix/store/x\n")
		case p == "/old/x.nar":
			http.Redirect(w, r, "/new/x.nar", http.StatusTemporaryRedirect)
		case p == "/new/x.nar":
			w.Header().Set("Content-Type", "application/x-nix-nar")
			io.WriteString(w, "NAR")
		case strings.HasPrefix(p, "/chain/"): // /chain/N redirects N more times
			n, _ := strconv.Atoi(strings.TrimPrefix(p, "/chain/"))
			if n > 0 {
				http.Redirect(w, r, fmt.Sprintf("/chain/%d", n-1), http.StatusFound)
				return
			}
			io.WriteString(w, "end of chain")
		}
	})
	c := newClient(t, Options{URL: srv.URL, NetrcFile: netrcFor(t), DownAfter: 1, Timeout: 10 * time.Second}) // no timeout is tested here: a loaded CI machine may take longer than testTimeout

	for _, rel := range []string{"old/x.narinfo", "absolute/x.narinfo"} {
		body, err := c.Get(t.Context(), rel, 100)
		if err != nil || string(body) != "StorePath: /nix/store/x\n" {
			t.Fatalf("Get(%s) = %q, %v", rel, body, err)
		}
		// The credentials follow a redirect within the origin.
		if got := <-auth; got == "" {
			t.Errorf("Get(%s): redirected request lost its credentials", rel)
		}
	}
	rc, _, err := c.Open(t.Context(), "old/x.nar")
	if err != nil {
		t.Fatal(err)
	}
	data, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || string(data) != "NAR" {
		t.Fatalf("Open via redirect: %q, %v", data, err)
	}

	if body, err := c.Get(t.Context(), fmt.Sprintf("chain/%d", MaxRedirects), 100); err != nil || string(body) != "end of chain" {
		t.Fatalf("%d redirects: %q, %v", MaxRedirects, body, err)
	}
	before := hits.Load()
	_, err = c.Get(t.Context(), fmt.Sprintf("chain/%d", MaxRedirects+1), 100)
	assertUnavailable(t, err, http.StatusFound)
	if !errors.Is(err, ErrRedirectRefused) || !strings.Contains(err.Error(), "more than 5 redirects") {
		t.Errorf("too many redirects: %v", err)
	}
	if n := hits.Load() - before; n != MaxRedirects+1 {
		t.Errorf("%d requests for a chain of %d redirects, want %d", n, MaxRedirects+1, MaxRedirects+1)
	}
	if !c.Up() {
		t.Error("a refused redirect marked the upstream down; it answered")
	}
}

// A redirect to another origin is an outage, not data and not a miss, and
// the other origin is never contacted: it would get the credentials.
func TestRedirectOtherOrigin(t *testing.T) {
	otherAuth := make(chan string, 10)
	other, otherHits := server(t, nil, func(w http.ResponseWriter, r *http.Request) {
		otherAuth <- r.Header.Get("Authorization")
		io.WriteString(w, "StorePath: /nix/store/evil\n")
	})
	var target string // set per case below, before any request
	srv, _ := server(t, nil, func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, target, http.StatusFound)
	})
	srvURL, _ := url.Parse(srv.URL)
	otherURL, _ := url.Parse(other.URL)

	for _, tc := range []struct{ name, target, named string }{
		{"other port", other.URL + "/x?X-Amz-Signature=s3cret", otherURL.Host},
		{"other host name", "http://localhost:" + srvURL.Port() + "/x", "localhost:" + srvURL.Port()},
		{"other scheme", "https://" + srvURL.Host + "/x", "https://" + srvURL.Host},
		{"userinfo", "http://mallory:pw@" + otherURL.Host + "/x", otherURL.Host},
	} {
		t.Run(tc.name, func(t *testing.T) {
			target = tc.target
			c := newClient(t, Options{URL: srv.URL, NetrcFile: netrcFor(t), DownAfter: 1, Timeout: 10 * time.Second}) // no timeout is tested here: a loaded CI machine may take longer than testTimeout
			_, err := c.Get(t.Context(), "x.narinfo", 100)
			assertUnavailable(t, err, http.StatusFound)
			if !errors.Is(err, ErrRedirectRefused) {
				t.Errorf("Get: want ErrRedirectRefused, got %v", err)
			}
			msg := err.Error()
			if !strings.Contains(msg, tc.named) {
				t.Errorf("error does not name the refused target %s: %s", tc.named, msg)
			}
			// Neither the presigned query nor any userinfo reaches the logs.
			if strings.Contains(msg, "s3cret") || strings.Contains(msg, "mallory") {
				t.Errorf("error leaks the target's query or userinfo: %s", msg)
			}
			_, _, err = c.Open(t.Context(), "nar/x.nar")
			assertUnavailable(t, err, http.StatusFound)
			if !errors.Is(err, ErrRedirectRefused) {
				t.Errorf("Open: want ErrRedirectRefused, got %v", err)
			}
			if !c.Up() {
				t.Error("a refused redirect marked the upstream down")
			}
		})
	}
	if n := otherHits.Load(); n != 0 {
		t.Fatalf("the other origin received %d requests (credentials %q)", n, <-otherAuth)
	}
}

func TestOrigin(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		same bool
	}{
		{"https://cache.example", "https://cache.example:443/x", true},
		{"http://cache.example", "http://CACHE.example:80/", true},
		{"http://[::1]:8080/root/", "http://[::1]:8080/other", true},
		{"https://cache.example", "http://cache.example", false},
		{"https://cache.example", "https://cache.example:8443", false},
		{"https://cache.example", "https://cdn.cache.example", false},
		{"http://127.0.0.1:80", "http://localhost", false},
	} {
		a, _ := url.Parse(tc.a)
		b, _ := url.Parse(tc.b)
		if got := origin(a) == origin(b); got != tc.same {
			t.Errorf("origin(%s) == origin(%s): %v (%s, %s)", tc.a, tc.b, got, origin(a), origin(b))
		}
	}
}
