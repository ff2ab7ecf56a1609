// Package nix_test checks the Nix expressions in this directory with the
// Nix installed here (Debian's nix-bin is enough): both parse, and the
// NixOS module, evaluated against a stub lib and stub packages
// (testdata/eval-module.nix), produces the service the systemd unit in
// ../systemd describes.
package nix_test

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
)

func nixInstantiate(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("nix-instantiate")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("nix-instantiate is not on PATH (CI is set, refusing to skip)")
		}
		t.Skip("SKIP: nix-instantiate is not on PATH (Debian: apt-get install nix-bin)")
	}
	return p
}

func TestParse(t *testing.T) {
	tool := nixInstantiate(t)
	for _, f := range []string{"package.nix", "module.nix", "testdata/eval-module.nix"} {
		if out, err := exec.Command(tool, "--parse", f).CombinedOutput(); err != nil {
			t.Errorf("nix-instantiate --parse %s: %v\n%s", f, err, out)
		}
	}
}

type service struct {
	Description    string         `json:"description"`
	WantedBy       []string       `json:"wantedBy"`
	After          []string       `json:"after"`
	ReloadTriggers []string       `json:"reloadTriggers"`
	ServiceConfig  map[string]any `json:"serviceConfig"`
}

type nixosConfig struct {
	Environment struct {
		Etc map[string]struct {
			Source string `json:"source"`
		} `json:"etc"`
		SystemPackages []string `json:"systemPackages"`
	} `json:"environment"`
	Networking struct {
		Firewall struct {
			AllowedTCPPorts []int `json:"allowedTCPPorts"`
		} `json:"firewall"`
	} `json:"networking"`
	Services struct {
		Cacheproxy struct {
			Settings map[string]any `json:"settings"`
		} `json:"cacheproxy"`
	} `json:"services"`
	Systemd struct {
		Services map[string]service `json:"services"`
	} `json:"systemd"`
}

type evalResult struct {
	Options         []string       `json:"options"`
	SettingsOptions []string       `json:"settingsOptions"`
	Enabled         nixosConfig    `json:"enabled"`
	Disabled        map[string]any `json:"disabled"`
	Assertions      []bool         `json:"assertions"`
	NoKeys          struct {
		ExecStart      string         `json:"ExecStart"`
		LoadCredential []string       `json:"LoadCredential"`
		Settings       map[string]any `json:"settings"`
		Firewall       any            `json:"firewall"`
	} `json:"noKeys"`
}

func evalModule(t *testing.T) evalResult {
	t.Helper()
	tool := nixInstantiate(t)
	cmd := exec.Command(tool, "--eval", "--strict", "--json", "testdata/eval-module.nix")
	// A throwaway state dir: evaluation writes nothing, but Nix wants one.
	state := t.TempDir()
	cmd.Env = append(os.Environ(), "HOME="+state, "XDG_CACHE_HOME="+filepath.Join(state, "cache"))
	out, err := cmd.Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("evaluating the module: %v\n%s", err, stderr)
	}
	var r evalResult
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("module evaluation output: %v\n%s", err, out)
	}
	return r
}

func TestModuleEvaluates(t *testing.T) {
	r := evalModule(t)
	wantOptions := []string{"adminTokenFile", "enable", "openFirewall", "package", "settings", "signingKeyFile"}
	if !slices.Equal(r.Options, wantOptions) {
		t.Errorf("options %v, want %v", r.Options, wantOptions)
	}
	if !slices.Equal(r.Assertions, []bool{true, false}) {
		t.Errorf("assertions %v, want [true false] (key files outside, then inside the store)", r.Assertions)
	}
	if len(r.Disabled) != 0 {
		t.Errorf("a disabled module sets %v", r.Disabled)
	}
	c := r.Enabled
	svc, ok := c.Systemd.Services["cacheproxy"]
	if !ok {
		t.Fatalf("no systemd.services.cacheproxy in %+v", c)
	}
	sc := svc.ServiceConfig
	for key, want := range map[string]any{
		"Type": "notify", "DynamicUser": true, "StateDirectory": "cacheproxy", "CapabilityBoundingSet": "",
		"ProtectSystem": "strict", "ProtectHome": true, "PrivateTmp": true, "NoNewPrivileges": true,
		"ExecReload": "/nix/store/00000000000000000000000000000000-coreutils/bin/kill -HUP $MAINPID",
		"ExecStart": "'/nix/store/00000000000000000000000000000000-cacheproxy/bin/cacheproxy' 'serve' '-c' '/etc/cacheproxy/cacheproxy.toml' " +
			"'--signing-key-file=%d/signing-key' '--admin-token-file=%d/admin-token'",
	} {
		if fmt.Sprint(sc[key]) != fmt.Sprint(want) {
			t.Errorf("serviceConfig.%s = %#v, want %#v", key, sc[key], want)
		}
	}
	if got := fmt.Sprint(sc["LoadCredential"]); got != "[signing-key:/etc/cacheproxy/signing-key admin-token:/etc/cacheproxy/admin-token]" {
		t.Errorf("LoadCredential = %s", got)
	}
	if !slices.Equal(c.Networking.Firewall.AllowedTCPPorts, []int{5480}) {
		t.Errorf("openFirewall opened %v, want the listen port 5480", c.Networking.Firewall.AllowedTCPPorts)
	}
	toml := c.Environment.Etc["cacheproxy/cacheproxy.toml"].Source
	if toml == "" || !slices.Contains(svc.ReloadTriggers, toml) {
		t.Errorf("/etc/cacheproxy/cacheproxy.toml (%q) is not a reload trigger (%v)", toml, svc.ReloadTriggers)
	}
	// Admin commands run by root read the key files themselves.
	s := c.Services.Cacheproxy.Settings
	if s["signing_key_file"] != "/etc/cacheproxy/signing-key" || fmt.Sprint(s["admin"]) != "map[token_file:/etc/cacheproxy/admin-token]" {
		t.Errorf("settings defaults from the key files: %v", s)
	}

	// Without key files: nothing to load, no flags, the port stays closed.
	if strings.Contains(r.NoKeys.ExecStart, "%d") || len(r.NoKeys.LoadCredential) != 0 || len(r.NoKeys.Settings) != 0 {
		t.Errorf("without key files: ExecStart %q, LoadCredential %v, settings %v", r.NoKeys.ExecStart, r.NoKeys.LoadCredential, r.NoKeys.Settings)
	}
	if m, ok := r.NoKeys.Firewall.(map[string]any); !ok || len(m) != 0 {
		t.Errorf("without openFirewall the firewall gets %v", r.NoKeys.Firewall)
	}
}

// unitDirectives reads the [Service] section of a unit file: key -> values
// (a key may repeat), each value split into words with a leading ~ applied
// to every word, as systemd reads list settings.
func unitDirectives(t *testing.T, file string) map[string][]string {
	t.Helper()
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]string{}
	section := ""
	for _, line := range strings.Split(string(raw), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if strings.HasPrefix(line, "[") {
			section = line
			continue
		}
		k, v, _ := strings.Cut(line, "=")
		if section == "[Service]" {
			out[k] = append(out[k], words(v)...)
		}
	}
	return out
}

func words(v string) []string {
	neg := strings.HasPrefix(v, "~")
	var w []string
	for _, f := range strings.Fields(strings.TrimPrefix(v, "~")) {
		if neg {
			f = "~" + f
		}
		w = append(w, f)
	}
	return w
}

// moduleWords renders a serviceConfig value as the unit file would.
func moduleWords(v any) []string {
	switch v := v.(type) {
	case bool:
		if v {
			return []string{"yes"}
		}
		return []string{"no"}
	case []any:
		var w []string
		for _, e := range v {
			w = append(w, moduleWords(e)...)
		}
		return w
	case float64:
		return []string{fmt.Sprint(v)}
	case string:
		return words(v)
	}
	return []string{fmt.Sprintf("%v", v)}
}

// The NixOS module and systemd/cacheproxy.service run the service the same
// way: every directive of one is in the other with the same value, except
// the paths (binary, config, credential sources).
func TestModuleMatchesUnit(t *testing.T) {
	unit := unitDirectives(t, filepath.Join("..", "systemd", "cacheproxy.service"))
	sc := evalModule(t).Enabled.Systemd.Services["cacheproxy"].ServiceConfig
	paths := map[string]bool{"ExecStart": true, "ExecReload": true, "LoadCredential": true}
	var keys []string
	for k := range unit {
		keys = append(keys, k)
	}
	for k := range sc {
		if _, ok := unit[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		if paths[k] {
			continue
		}
		u, inUnit := unit[k]
		m, inModule := sc[k]
		switch {
		case !inModule:
			t.Errorf("%s=%s is in the unit, not in the module", k, strings.Join(u, " "))
		case !inUnit:
			t.Errorf("%s = %v is in the module, not in the unit", k, m)
		default:
			mw := moduleWords(m)
			if !slices.Equal(sorted(u), sorted(mw)) {
				t.Errorf("%s: unit %q, module %q", k, u, mw)
			}
		}
	}
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	sort.Strings(s)
	return s
}

// The package builds with liblzma: the tag, cgo, and xz (liblzma) and
// pkg-config as inputs. Evaluated with a stub buildGoModule that returns its
// arguments, so no nixpkgs is needed.
func TestPackageUsesLiblzma(t *testing.T) {
	tool := nixInstantiate(t)
	expr := `let
	  lib = { fileset = { toSource = _: "src"; unions = _: "files"; }; platforms.linux = [ "x86_64-linux" ]; };
	  pkg = import ./package.nix { inherit lib; buildGoModule = args: args; pkg-config = "pkg-config"; xz = "xz"; };
	in { inherit (pkg) tags nativeBuildInputs buildInputs; cgo = pkg.env.CGO_ENABLED; }`
	cmd := exec.Command(tool, "--eval", "--strict", "--json", "-E", expr)
	state := t.TempDir()
	cmd.Env = append(os.Environ(), "HOME="+state, "XDG_CACHE_HOME="+filepath.Join(state, "cache"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("evaluating package.nix: %v\n%s", err, out)
	}
	var got struct {
		Tags              []string `json:"tags"`
		NativeBuildInputs []string `json:"nativeBuildInputs"`
		BuildInputs       []string `json:"buildInputs"`
		CGO               int      `json:"cgo"`
	}
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if !slices.Contains(got.Tags, "liblzma") || got.CGO != 1 ||
		!slices.Contains(got.BuildInputs, "xz") || !slices.Contains(got.NativeBuildInputs, "pkg-config") {
		t.Errorf("package.nix builds with %+v, want tag liblzma, CGO_ENABLED 1, xz and pkg-config", got)
	}
}
