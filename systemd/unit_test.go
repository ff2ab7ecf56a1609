// Package systemd_test checks the unit file and the example configuration
// in this directory, the unit with the real systemd-analyze: it must
// verify, and its exposure score must stay what the README records.
package systemd_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/cacheproxy/cacheproxy/internal/config"
)

const unitName = "cacheproxy.service"

// installedBinary is where the unit expects cacheproxy.
const installedBinary = "/usr/local/bin/cacheproxy"

func requireTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is not on PATH (CI is set, refusing to skip)", name)
		}
		t.Skipf("SKIP: %s is not on PATH (Debian: apt-get install systemd)", name)
	}
	return p
}

// unitCopy writes the unit into a temp dir with ExecStart pointing at an
// executable that exists here (verify checks it), the running test binary.
func unitCopy(t *testing.T) string {
	t.Helper()
	raw, err := os.ReadFile(unitName)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(raw), "ExecStart="+installedBinary+" ") {
		t.Fatalf("%s: ExecStart does not run %s", unitName, installedBinary)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	unit := filepath.Join(t.TempDir(), unitName)
	text := strings.ReplaceAll(string(raw), installedBinary, exe)
	if err := os.WriteFile(unit, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return unit
}

func TestUnitVerifies(t *testing.T) {
	tool := requireTool(t, "systemd-analyze")
	unit := unitCopy(t)
	out, err := exec.Command(tool, "verify", unit).CombinedOutput()
	if err != nil || strings.Contains(string(out), unitName) {
		// verify exits 0 on some warnings about the unit; any line that
		// names it is a problem too.
		t.Fatalf("systemd-analyze verify %s: %v\n%s", unitName, err, out)
	}
}

// The directives the README promises, at least as far as harmonia's NixOS
// module goes.
func TestUnitHardening(t *testing.T) {
	raw, err := os.ReadFile(unitName)
	if err != nil {
		t.Fatal(err)
	}
	lines := map[string]bool{}
	for _, l := range strings.Split(string(raw), "\n") {
		lines[strings.TrimSpace(l)] = true
	}
	for _, want := range []string{
		"Type=notify", "DynamicUser=yes", "StateDirectory=cacheproxy", "ProtectSystem=strict", "ProtectHome=yes",
		"PrivateTmp=yes", "NoNewPrivileges=yes", "CapabilityBoundingSet=", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
		"SystemCallFilter=@system-service", "ExecReload=/bin/kill -HUP $MAINPID",
		"LoadCredential=signing-key:/etc/cacheproxy/signing-key", "LoadCredential=admin-token:/etc/cacheproxy/admin-token",
		"PrivateDevices=yes", "ProtectKernelTunables=yes", "ProtectKernelModules=yes", "ProtectControlGroups=yes",
		"ProtectKernelLogs=yes", "ProtectHostname=yes", "ProtectClock=yes", "RestrictNamespaces=yes", "RestrictRealtime=yes",
		"MemoryDenyWriteExecute=yes", "LockPersonality=yes", "SystemCallArchitectures=native", "ProcSubset=pid",
		"ProtectProc=invisible", "PrivateUsers=yes", "PrivateMounts=yes",
	} {
		if !lines[want] {
			t.Errorf("%s lacks %q", unitName, want)
		}
	}
}

// The README records the exposure score; a change that raises it must
// update the README.
func TestUnitSecurityScore(t *testing.T) {
	tool := requireTool(t, "systemd-analyze")
	unit := unitCopy(t)
	out, err := exec.Command(tool, "security", "--offline=true", "--no-pager", unit).CombinedOutput()
	if err != nil && strings.Contains(string(out), "--offline") {
		t.Skipf("SKIP: this systemd-analyze has no security --offline: %s", out)
	}
	m := regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+)`).FindStringSubmatch(string(out))
	if m == nil {
		t.Fatalf("systemd-analyze security printed no exposure level (%v):\n%s", err, out)
	}
	score, _ := strconv.ParseFloat(m[1], 64)
	readme, rerr := os.ReadFile(filepath.Join("..", "README.md"))
	if rerr != nil {
		t.Fatal(rerr)
	}
	if !strings.Contains(string(readme), "exposure level "+m[1]) {
		t.Errorf("systemd-analyze security scores the unit %s, which README.md does not record (\"exposure level %s\")", m[1], m[1])
	}
	if score > 2.0 {
		t.Errorf("exposure level %.1f, want at most 2.0:\n%s", score, out)
	}
}

// The example configuration parses, and validates once the key file it
// names (root's, on a real host) is set aside.
func TestExampleConfig(t *testing.T) {
	cfg, err := config.Load("cacheproxy.toml", config.Env{})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.SigningKeyFile != "/etc/cacheproxy/signing-key" || cfg.Admin.TokenFile != "/etc/cacheproxy/admin-token" {
		t.Errorf("the example does not name the files the unit loads as credentials: %q, %q", cfg.SigningKeyFile, cfg.Admin.TokenFile)
	}
	cfg.SigningKeyFile = ""
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
}
