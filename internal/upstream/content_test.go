package upstream

import (
	"errors"
	"io"
	"net/http"
	"testing"
)

func TestHTMLAnswers(t *testing.T) {
	srv, _ := server(t, nil, func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		switch r.URL.Path {
		case "/typed.narinfo":
			h.Set("Content-Type", "text/html; charset=utf-8")
			io.WriteString(w, "<html><body>Sign in</body></html>")
		case "/typed-upper.narinfo": // the type alone is enough
			h.Set("Content-Type", "TEXT/HTML")
			io.WriteString(w, "StorePath: /nix/store/x\n")
		case "/xhtml.narinfo":
			h.Set("Content-Type", "application/xhtml+xml")
			io.WriteString(w, "StorePath: /nix/store/x\n")
		case "/sniffed.narinfo":
			h.Set("Content-Type", "text/x-nix-narinfo")
			io.WriteString(w, " \r\n\t<!DOCTYPE html><html>502 Bad Gateway</html>")
		case "/bom.narinfo":
			h.Set("Content-Type", "application/octet-stream")
			io.WriteString(w, "\ufeff<html></html>")
		case "/nix-cache-info":
			h.Set("Content-Type", "text/plain")
			io.WriteString(w, "<?xml version=\"1.0\"?><Error><Code>AccessDenied</Code></Error>")
		case "/fine.narinfo":
			h.Set("Content-Type", "text/x-nix-narinfo")
			io.WriteString(w, "StorePath: /nix/store/x\n")
		case "/log/x.drv": // build logs are free text
			h.Set("Content-Type", "text/plain; charset=utf-8")
			io.WriteString(w, "<stdin>:1: warning: something\n")
		case "/x.ls": // encoded bytes are binary: not sniffed
			h.Set("Content-Type", "application/json")
			h.Set("Content-Encoding", "br")
			io.WriteString(w, "<\x00\x01binary")
		case "/nar/typed.nar.xz":
			h.Set("Content-Type", "text/html")
			io.WriteString(w, "<html>oops</html>")
		case "/nar/lt.nar.zst": // a compressed NAR may start with any byte
			h.Set("Content-Type", "application/x-nix-nar")
			io.WriteString(w, "<\x00\x01binary")
		}
	})
	// DownAfter 1: an HTML page is an answer, never a sign of an outage.
	c := newClient(t, Options{URL: srv.URL, DownAfter: 1})
	ctx := t.Context()

	for _, rel := range []string{"typed.narinfo", "typed-upper.narinfo", "xhtml.narinfo", "sniffed.narinfo", "bom.narinfo", "nix-cache-info"} {
		body, err := c.Get(ctx, rel, 1000)
		if !errors.Is(err, ErrNotCacheData) {
			t.Errorf("Get(%s) = %q, %v; want ErrNotCacheData", rel, body, err)
			continue
		}
		assertUnavailable(t, err, http.StatusOK)
	}
	for rel, want := range map[string]string{
		"fine.narinfo": "StorePath: /nix/store/x\n",
		"log/x.drv":    "<stdin>:1: warning: something\n",
		"x.ls":         "<\x00\x01binary",
	} {
		if body, err := c.Get(ctx, rel, 1000); err != nil || string(body) != want {
			t.Errorf("Get(%s) = %q, %v; want %q", rel, body, err, want)
		}
	}

	_, _, err := c.Open(ctx, "nar/typed.nar.xz")
	if !errors.Is(err, ErrNotCacheData) {
		t.Errorf("Open of an HTML page: %v, want ErrNotCacheData", err)
	}
	assertUnavailable(t, err, http.StatusOK)
	rc, _, err := c.Open(ctx, "nar/lt.nar.zst")
	if err != nil {
		t.Fatalf("Open of a NAR starting with '<': %v", err)
	}
	data, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || string(data) != "<\x00\x01binary" {
		t.Errorf("NAR body %q, %v", data, err)
	}
	if !c.Up() {
		t.Error("HTML answers marked the upstream down")
	}
}

func TestIsHTML(t *testing.T) {
	for ct, want := range map[string]bool{
		"text/html":                         true,
		"text/html; charset=UTF-8":          true,
		"Text/HTML;charset=\"broken":        true, // malformed parameter, clear type
		"application/xhtml+xml":             true,
		"":                                  false,
		"text/plain":                        false,
		"text/x-nix-narinfo":                false,
		"application/x-nix-nar":             false,
		"text/htmlx":                        false,
		"application/octet-stream; x=<html": false,
	} {
		if got := isHTML(ct); got != want {
			t.Errorf("isHTML(%q) = %v, want %v", ct, got, want)
		}
	}
}
