package gate

import (
	"testing"

	"github.com/cacheproxy/cacheproxy/internal/upstream"
)

// The status page names upstreams without credentials, queries or file
// system paths.
func TestPublicUpstreamName(t *testing.T) {
	var ups []Upstream
	for _, u := range []string{"https://user:secret@cache.example.org/sub", "file://" + t.TempDir()} {
		c, err := upstream.New(upstream.Options{URL: u})
		if err != nil {
			t.Fatal(err)
		}
		ups = append(ups, Upstream{Client: c})
	}
	for name, want := range map[string]string{
		ups[0].Name():                 "https://cache.example.org/sub",
		ups[1].Name():                 "upstreams[1] (local directory)",
		"file:///srv/removed/cache":   "(local directory)",
		"http://internal.example:81/": "http://internal.example:81/",
		"":                            "",
	} {
		if got := publicUpstreamName(ups, name); got != want {
			t.Errorf("publicUpstreamName(%q) = %q, want %q", name, got, want)
		}
	}
}
