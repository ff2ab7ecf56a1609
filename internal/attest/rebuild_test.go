package attest

import (
	"reflect"
	"strings"
	"testing"
)

// A rebuilder's "cacheproxy" object travels with its claim, in every JSON
// shape; hashes take every form narHash does.
func TestRebuildReport(t *testing.T) {
	const p = "/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1"
	const h = "sha256-+fjdEr0gKyeb5anph/WVOm2m8f9Qa1khFnCXXpOE59I="
	const other = "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
	report := `{"classification":"not_reproducible","upstreamNarHash":"` + h + `",` +
		`"builds":[{"narHash":"` + other + `","narSize":504},{"narHash":{"algorithm":"sha256","format":"sri","hash":"` + h + `"},"narSize":505}]}`
	fields := `"narHash":"` + h + `","narSize":504,"references":[],"cacheproxy":` + report
	want := &Rebuild{Classification: ClassNotReproducible, UpstreamNarHash: mustSHA256(h),
		Builds: []Build{{NarHash: mustSHA256(other), NarSize: 504}, {NarHash: mustSHA256(h), NarSize: 505}}}
	for _, in := range []string{
		`[{"path":"` + p + `",` + fields + `}]`,
		`{"` + p + `":{` + fields + `}}`,
		`{"version":2,"storeDir":"/nix/store","info":{"5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1":{` + fields + `}}}`,
	} {
		cs, err := Parse([]byte(in), storeDir)
		if err != nil {
			t.Fatalf("%s: %v", in, err)
		}
		if len(cs) != 1 || !reflect.DeepEqual(cs[0].Rebuild, want) {
			t.Fatalf("%s: rebuild %+v, want %+v", in, cs[0].Rebuild, want)
		}
	}
	// Optional: absent or null means no report; stable alone is enough.
	for in, want := range map[string]*Rebuild{
		`[{"path":"` + p + `","narHash":"` + h + `","narSize":1,"references":[]}]`:                                          nil,
		`[{"path":"` + p + `","narHash":"` + h + `","narSize":1,"references":[],"cacheproxy":null}]`:                        nil,
		`[{"path":"` + p + `","narHash":"` + h + `","narSize":1,"references":[],"cacheproxy":{"classification":"stable"}}]`: {Classification: ClassStable},
	} {
		cs, err := Parse([]byte(in), storeDir)
		if err != nil || !reflect.DeepEqual(cs[0].Rebuild, want) {
			t.Fatalf("%s: %+v %v, want %+v", in, cs, err, want)
		}
	}
}

func TestRebuildReportErrors(t *testing.T) {
	const p = "/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1"
	const h = `"sha256-+fjdEr0gKyeb5anph/WVOm2m8f9Qa1khFnCXXpOE59I="`
	entry := func(report string) string {
		return `[{"path":"` + p + `","narHash":` + h + `,"narSize":1,"references":[],"cacheproxy":` + report + `}]`
	}
	for report, want := range map[string][]string{
		`"stable"`:                         {"entry 1", "cacheproxy", "object"},
		`{"classification":"flaky"}`:       {"cacheproxy.classification", "flaky", "stable", "not_reproducible"},
		`{"classification":1}`:             {"cacheproxy.classification", "string"},
		`{"classificaton":"stable"}`:       {"cacheproxy.classificaton", "unknown field"},
		`{"upstreamNarHash":"sha256:abc"}`: {"cacheproxy.upstreamNarHash"},
		`{"upstreamNarHash":"sha1:dyx0ryw8s1srxlwfj4fkk9k5qln6swhb"}`: {"cacheproxy.upstreamNarHash", "sha256"},
		`{"builds":{}}`:                                         {"cacheproxy.builds", "array"},
		`{"builds":[1]}`:                                        {"cacheproxy.builds[0]", "object"},
		`{"builds":[{"narHash":` + h + `}]}`:                    {"cacheproxy.builds[0].narSize", "missing"},
		`{"builds":[{"narSize":1}]}`:                            {"cacheproxy.builds[0].narHash", "missing"},
		`{"builds":[{"narHash":` + h + `,"narSize":1,"x":2}]}`:  {"cacheproxy.builds[0].x", "unknown field"},
		`{"classification":"stable","classification":"stable"}`: {"cacheproxy", "more than once"},
	} {
		_, err := Parse([]byte(entry(report)), storeDir)
		if err == nil {
			t.Errorf("%s: accepted", report)
			continue
		}
		for _, w := range want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %q does not mention %q", report, err, w)
			}
		}
	}
}
