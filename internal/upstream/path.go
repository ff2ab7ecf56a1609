package upstream

import (
	"fmt"
	"net/url"
	"strings"
)

// maxRelLen bounds a relative path; real ones ("nar/<52 chars>.nar.xz") are
// far shorter, and a long one is only ever an attack on logs or servers.
const maxRelLen = 1024

// checkRel validates a path relative to the cache root and returns it as a
// relative URL reference. It is the single gate that keeps requests inside
// the cache root, so it checks the decoded path (catching "%2e%2e" and
// "%2f") as well as the raw text. A query is allowed because some caches
// (harmonia) put one in narinfo URL fields; file:// callers refuse it.
func checkRel(rel string) (*url.URL, error) {
	bad := func(why string) (*url.URL, error) {
		return nil, fmt.Errorf("%q: %s: %w", truncate(rel), why, ErrInvalidPath)
	}
	if rel == "" {
		return bad("empty")
	}
	if len(rel) > maxRelLen {
		return bad("too long")
	}
	if i := strings.IndexFunc(rel, func(r rune) bool { return r < 0x20 || r == 0x7f || r == '\\' }); i >= 0 {
		return bad("control character or backslash")
	}
	if strings.HasPrefix(rel, "/") {
		return bad("absolute path")
	}
	u, err := url.Parse(rel)
	if err != nil {
		return bad("not a URL path")
	}
	if u.Scheme != "" || u.Opaque != "" {
		// Includes absolute http(s) URLs in a narinfo's URL field: fetching
		// from wherever a narinfo points is not supported.
		return bad("has a scheme; only paths relative to the cache root are supported")
	}
	if u.Host != "" || u.User != nil {
		return bad("names a host")
	}
	if u.Fragment != "" || strings.Contains(rel, "#") {
		return bad("has a fragment")
	}
	if strings.ContainsAny(u.Path, "\\\x00") {
		return bad("encoded backslash or NUL")
	}
	for _, seg := range strings.Split(u.Path, "/") {
		switch seg {
		case "":
			return bad("empty path segment")
		case ".", "..":
			return bad("dot segment")
		}
	}
	return u, nil
}

// truncate keeps hostile input from flooding error messages and logs.
func truncate(s string) string {
	if len(s) > 100 {
		return s[:100] + "..."
	}
	return s
}
