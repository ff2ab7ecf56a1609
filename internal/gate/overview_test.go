package gate

import (
	"testing"

	"github.com/cacheproxy/cacheproxy/internal/upstream"
)

// The status page names upstreams without credentials, queries or file
// system paths.
func TestPublicUpstreamName(t *testing.T) {
	g := &Gate{}
	for _, u := range []string{"https://user:secret@cache.example.org/sub", "file://" + t.TempDir()} {
		c, err := upstream.New(upstream.Options{URL: u})
		if err != nil {
			t.Fatal(err)
		}
		g.upstreams = append(g.upstreams, Upstream{Client: c})
	}
	for name, want := range map[string]string{
		g.upstreams[0].Name():         "https://cache.example.org/sub",
		g.upstreams[1].Name():         "upstreams[1] (local directory)",
		"file:///srv/removed/cache":   "(local directory)",
		"http://internal.example:81/": "http://internal.example:81/",
		"":                            "",
	} {
		if got := g.publicUpstreamName(name); got != want {
			t.Errorf("publicUpstreamName(%q) = %q, want %q", name, got, want)
		}
	}
}
