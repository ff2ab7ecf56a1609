package config

// Native fuzz targets (go test -fuzz). Plain `go test` replays the f.Add seeds
// and testdata/fuzz/<FuzzName>/ on every run; to fuzz one target:
//
//	go test -run XXX -fuzz '^FuzzConfig$' -fuzztime 3m -parallel 1 ./internal/config/

import (
	"math"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"
)

// fuzzStrict turns known, reported bugs back into failures (see the
// crashers-*.txt files in testdata/fuzz/).
var fuzzStrict = os.Getenv("CACHEPROXY_FUZZ_STRICT") != ""

// fuzzKnownBug fails in strict mode and otherwise tells the caller to stop
// looking at this input, so that fuzzing can find other problems.
func fuzzKnownBug(t *testing.T, format string, args ...any) bool {
	t.Helper()
	if fuzzStrict {
		t.Fatalf("known bug: "+format, args...)
	}
	return true
}

// Files the fuzzed config may name are replaced by these before Validate,
// which opens them: the fuzzer must not make the test open arbitrary paths
// (device files, FIFOs), and the outcome must not depend on the machine.
const (
	fuzzReadableFile = "testdata/full.toml"
	fuzzDirectory    = "testdata"
)

func fuzzSafePath(p string) string {
	switch {
	case p == "":
		return ""
	case strings.HasSuffix(p, "/"):
		return fuzzDirectory
	default:
		return fuzzReadableFile
	}
}

// FuzzConfig: Parse never panics and returns the zero Config with an error;
// no parsed duration is negative; Validate and Marshal never panic; a config
// that validates marshals to TOML that parses back to an equal Config, which
// validates and marshals to the same bytes.
func FuzzConfig(f *testing.F) {
	full, err := os.ReadFile("testdata/full.toml")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(full)
	if unit, err := os.ReadFile("../../systemd/cacheproxy.toml"); err == nil {
		f.Add(unit)
	}
	if out, err := Defaults(Env{}).Marshal(); err == nil {
		f.Add(out)
	}
	for _, s := range []string{
		``,
		`listen = "[::]:80"` + "\n" + `mode = "report"` + "\n[admin]\nlisten = \"\"\n",
		"[[upstreams]]\nurl = \"file:///srv/cache\"\npublic_keys = [\"" + DefaultUpstreamKey + "\"]\ntimeout = \"1d12h\"\nnetrc_file = \"/etc/nix/netrc\"\n",
		"[[upstreams]]\nurl = \"https://a.example\"\npublic_keys = [\"" + DefaultUpstreamKey + "\"]\ntimeout = \"0s\"\n[[upstreams]]\nurl = \"http://b.example:8080/x\"\npublic_keys = [\"k:bad\"]\n",
		"[cache]\nmax_size = 1024\n[policy]\nquorum = 0\ncontent_addressed = true\n",
		"[cache]\nmax_size = \"1.5GiB\"\n",
		"quorom = 2\n",
		"store_dir = \"/nix/store/\"\npriority = -1\n",
		"[policy]\nattesters = [\"a:cflnkb3HVHh13QHZ7lFmSm1yh3DJwBgNvwKr6STrEbc=\", \"a:OgTBKz42p0bT6N3tXq/6fo2KiNMECJa/zruDbZrdmUs=\"]\nquorum = 2\n",
		"upstreams = []\n",
		"[[upstreams]]\ntimeout = \"106751.9911673006d\"\nurl = \"https://cache.nixos.org\"\npublic_keys = [\"" + DefaultUpstreamKey + "\"]\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse(data, Env{})
		if err != nil {
			if !reflect.DeepEqual(cfg, Config{}) {
				t.Fatalf("Parse returned a config with error %v", err)
			}
			return
		}
		for i, u := range cfg.Upstreams {
			if u.Timeout.Duration < 0 && fuzzKnownBug(t, "upstreams[%d].timeout parsed as negative %d (ParseDuration refuses negatives)", i, u.Timeout.Duration) {
				return
			}
		}
		cfg.SigningKeyFile = fuzzSafePath(cfg.SigningKeyFile)
		for i := range cfg.Upstreams {
			cfg.Upstreams[i].NetrcFile = fuzzSafePath(cfg.Upstreams[i].NetrcFile)
		}
		verr := cfg.Validate()
		out, merr := cfg.Marshal()
		if verr != nil {
			return
		}
		if merr != nil {
			t.Fatalf("Marshal of a valid config failed: %v", merr)
		}
		back, err := Parse(out, Env{})
		if err != nil {
			t.Fatalf("Marshal output does not parse: %v\ninput:\n%s\nmarshaled:\n%s", err, data, out)
		}
		if err := back.Validate(); err != nil {
			t.Fatalf("Marshal output does not validate: %v\ninput:\n%s\nmarshaled:\n%s", err, data, out)
		}
		if !reflect.DeepEqual(back, cfg) {
			t.Fatalf("round trip differs:\n got %#v\nwant %#v\ninput:\n%s\nmarshaled:\n%s", back, cfg, data, out)
		}
		out2, err := back.Marshal()
		if err != nil || string(out2) != string(out) {
			t.Fatalf("Marshal not stable (%v):\n%s\n---\n%s", err, out, out2)
		}
	})
}

// FuzzUnits: ParseDuration and ParseSize never panic; ParseDuration never
// returns a negative duration (its doc: negatives are refused); what either
// accepts formats (FormatDuration, Size.String) to text that parses back to
// the same value, as MarshalText promises; and so does every non-negative
// duration and every size.
func FuzzUnits(f *testing.F) {
	for _, s := range []string{
		"30s", "12h", "30d", "1d12h", "0.5d", "+1h", " 90s ", "1h30m0s", "1.5h", "1ns", "0s", "0d",
		"-1s", "1d-1h", "d", "1e3d", "NaNd", "Infd", "106751d", "106751.9911673006d", "106751d23h47m16.854775807s",
		"100GiB", "500MB", "1024", "1.5GiB", "1.5", "0.5KiB", "1 kib", "18446744073709551615", "18446744073709551616",
		"16EiB", "16777216TiB", "1K", "", ".", "1..2MB", "1e3MB",
	} {
		f.Add(s, uint64(0))
	}
	f.Add("", uint64(math.MaxInt64))
	f.Add("", uint64(math.MaxUint64))
	f.Add("", uint64(90*time.Second))
	f.Add("", uint64(36*time.Hour))
	f.Fuzz(func(t *testing.T, s string, n uint64) {
		if d, err := ParseDuration(s); err == nil {
			if d < 0 && fuzzKnownBug(t, "ParseDuration(%q) = %d, negative", s, d) {
				return
			}
			fuzzDurationRoundTrip(t, d)
		}
		fuzzDurationRoundTrip(t, time.Duration(n&math.MaxInt64))

		if v, err := ParseSize(s); err == nil {
			fuzzSizeRoundTrip(t, v)
		}
		fuzzSizeRoundTrip(t, Size(n))
	})
}

func fuzzDurationRoundTrip(t *testing.T, d time.Duration) {
	t.Helper()
	txt, err := Duration{d}.MarshalText()
	if err != nil {
		t.Fatal(err)
	}
	var back Duration
	if err := back.UnmarshalText(txt); err != nil || back.Duration != d {
		t.Fatalf("duration %d formats as %q, which parses to %d, %v", d, txt, back.Duration, err)
	}
}

func fuzzSizeRoundTrip(t *testing.T, v Size) {
	t.Helper()
	txt, err := v.MarshalText()
	if err != nil {
		t.Fatal(err)
	}
	var back Size
	if err := back.UnmarshalText(txt); err != nil || back != v {
		t.Fatalf("size %d formats as %q, which parses to %d, %v", v, txt, back, err)
	}
}
