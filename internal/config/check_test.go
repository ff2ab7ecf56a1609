package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// check reads a file and returns every problem as printed.
func check(t *testing.T, content string) (string, []string) {
	t.Helper()
	p := writeFile(t, content)
	f, err := Read(Location{Path: p, From: FromFlag}, Env{})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, pr := range f.Check() {
		out = append(out, strings.TrimPrefix(pr.String(), p))
	}
	return p, out
}

func sameLines(t *testing.T, got, want []string) {
	t.Helper()
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("problems:\n got %s\nwant %s", strings.Join(got, "\n     "), strings.Join(want, "\n     "))
	}
}

// One run names every problem with its line and key: unknown keys and
// validation errors together, in file order of kind.
func TestCheckReportsEverythingWithLines(t *testing.T) {
	_, got := check(t, `listen = "127.0.0.1:5480"
mode = "enfroce"
listne = "x"

[[upstreams]]
url = "https://cache.example.org"
public_keys = ["cache.example.org-1:bad"]

[[upstreams]]
url = "ftp://mirror"
public_keys = [
  "`+keyC+`",
  "broken",
]
timeout = "0s"
public_key = "typo"

[policy]
attesters = ["`+keyA+`"]
quorom = 2
quorum = 3

[cache]
negative_ttl = "2h"
`)
	sameLines(t, got, []string{
		":2: mode: \"enfroce\" must be \"enforce\" or \"report\"",
		":3: listne: unknown key",
		`:7: upstreams[0].public_keys[0]: public key "cache.example.org-1": bad base64: illegal base64 data at input byte 0`,
		`:10: upstreams[1].url: "ftp://mirror": scheme must be http, https or file`,
		`:13: upstreams[1].public_keys[1]: public key: missing ':' between name and base64 data`,
		":15: upstreams[1].timeout: 0s must be positive",
		":16: upstreams[1].public_key: unknown key",
		":20: policy.quorom: unknown key",
		":21: policy.quorum: 3 is larger than the number of attesters (1)",
		":24: cache.negative_ttl: 2h must be between 0s and 1h",
	})
}

// TOML errors do not stop the read: each offending line is reported and
// skipped, and the rest of the file is still checked.
func TestCheckReportsSeveralSyntaxErrors(t *testing.T) {
	_, got := check(t, `listen = 
priority = 40
mode = "report
[policy]
quorum = "two"
quorom = 1
content_addressed = yes
[cache]
max_size = "lots"
scrub_period = "1m"
`)
	sameLines(t, got, []string{
		":1: listen: expected value but found '\\n' instead",
		":3: mode: strings cannot contain newlines",
		":5: policy.quorum: incompatible types: TOML value has type string; destination has type integer",
		":6: policy.quorom: unknown key",
		":7: policy.content_addressed: expected value but found \"yes\" instead",
		`:9: cache.max_size: size "lots": expected a number such as "100GiB" or "500MB"`,
		":10: cache.scrub_period: 1m is shorter than 1h; the scrub would do little but re-hash",
	})
}

// A problem with a value a flag set names the flag, not the file.
func TestCheckNamesOverridingFlag(t *testing.T) {
	p := writeFile(t, "listen = \"127.0.0.1:5480\"\n")
	f, err := Read(Location{Path: p, From: FromFlag}, Env{})
	if err != nil {
		t.Fatal(err)
	}
	f.Config.Listen = "nonsense"
	f.Override("listen", "--listen")
	ps := f.Check()
	if len(ps) != 1 || !strings.HasPrefix(ps[0].String(), "--listen: listen: ") {
		t.Fatalf("problems: %v", ps)
	}
}

// Keys in inline tables, arrays of inline tables, dotted keys and quoted
// keys get their lines too.
func TestKeyLines(t *testing.T) {
	lines := keyLines([]byte(`a = 1
policy.quorum = 2
[admin]
"we ird" = 3
[[upstreams]]
url = "x"
[[upstreams]]
public_keys = ["k0",
  "k1"]
[upstreams.sub]
x = { y = 1,
  z = 2 }
list = [{ u = 1 }, { v = 2 }]
`))
	for k, want := range map[string]int{"a": 1, "policy.quorum": 2, "admin": 3, `admin."we ird"`: 4,
		"upstreams[0]": 5, "upstreams[0].url": 6, "upstreams[1]": 7, "upstreams[1].public_keys": 8,
		"upstreams[1].public_keys[0]": 8, "upstreams[1].public_keys[1]": 9, "upstreams[1].sub": 10,
		"upstreams[1].sub.x.y": 11, "upstreams[1].sub.x.z": 12, "upstreams[1].sub.list[1].v": 13} {
		if got := lines[k]; got != want {
			t.Errorf("line of %s = %d, want %d", k, got, want)
		}
	}
}

// Locate: -c, then $CACHEPROXY_CONFIG, then the system path if it exists,
// then the embedded defaults.
func TestLocate(t *testing.T) {
	dir := t.TempDir()
	system := filepath.Join(dir, "cacheproxy.toml")
	for _, tc := range []struct {
		name, flag, env string
		systemExists    bool
		want            Location
	}{
		{"flag wins", "/a.toml", "/b.toml", true, Location{"/a.toml", FromFlag}},
		{"env", "", "/b.toml", true, Location{"/b.toml", FromEnv}},
		{"system", "", "", true, Location{system, FromSystem}},
		{"defaults", "", "", false, Location{"", FromDefaults}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			os.Remove(system)
			if tc.systemExists {
				os.WriteFile(system, []byte("mode = \"report\"\n"), 0o600)
			}
			got, err := Locate(tc.flag, Env{ConfigFile: tc.env, SystemConfig: system})
			if err != nil || got != tc.want {
				t.Fatalf("Locate = %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
	if got := (Location{"/etc/x.toml", FromEnv}).String(); got != "config /etc/x.toml (from $CACHEPROXY_CONFIG)" {
		t.Errorf("String = %q", got)
	}
	// A file named by -c or the variable must exist.
	_, err := Read(Location{filepath.Join(dir, "missing.toml"), FromEnv}, Env{})
	if err == nil || !strings.Contains(err.Error(), "missing.toml (from $CACHEPROXY_CONFIG)") {
		t.Errorf("missing file: %v", err)
	}
	// A system path that cannot be looked at is an error, not the defaults.
	if os.Geteuid() != 0 {
		locked := filepath.Join(dir, "locked")
		os.Mkdir(locked, 0o000)
		defer os.Chmod(locked, 0o700)
		if _, err := Locate("", Env{SystemConfig: filepath.Join(locked, "cacheproxy.toml")}); err == nil {
			t.Error("an unreadable system config dir falls back to the defaults")
		}
	}
}

func TestEnvFromOSConfig(t *testing.T) {
	t.Setenv("CACHEPROXY_CONFIG", "/srv/cp.toml")
	env := EnvFromOS()
	if env.ConfigFile != "/srv/cp.toml" || env.SystemConfig != "/etc/cacheproxy/cacheproxy.toml" {
		t.Fatalf("EnvFromOS = %+v", env)
	}
}

// The README's configuration block is a configuration: every key it shows
// exists, at the place it shows it.
func TestREADMEConfigurationBlock(t *testing.T) {
	raw, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, after, ok := strings.Cut(string(raw), "\n## Configuration\n")
	if !ok {
		t.Fatal("README has no Configuration section")
	}
	_, block, ok := strings.Cut(after, "```toml\n")
	block, _, ok2 := strings.Cut(block, "```")
	if !ok || !ok2 {
		t.Fatal("README's Configuration section has no ```toml block")
	}
	if _, err := Parse([]byte(block), Env{}); err != nil {
		t.Fatalf("README configuration block:\n%v", err)
	}
}

// An unknown list is one problem, not one per element; each entry of an
// unknown [[table]] is one.
func TestCheckUnknownLists(t *testing.T) {
	_, got := check(t, `extras = [1,
  2]
[[frobs]]
a = 1
[[frobs]]
b = 2
`)
	sameLines(t, got, []string{
		":1: extras: unknown key",
		":3: frobs[0]: unknown key",
		":5: frobs[1]: unknown key",
	})
}
