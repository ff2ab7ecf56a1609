package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// runRebuild runs the real `cacheproxy rebuild --once` against px as
// rebuilder-1, with the fixture side's Nix environment (the local store,
// where buildClosure built the derivations).
func runRebuild(t *testing.T, px *Proxy) (stdout, stderr string, err error) {
	t.Helper()
	requireBinary(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, cacheproxyBin, "rebuild", "--once",
		"--server", px.AdminURL, "--token-file", filepath.Join(px.StateDir, "admin-token"),
		"--key-file", rb1Key.SecFile)
	cmd.Dir = px.Dir
	cmd.Env = filterEnv(nixEnv(nixHome), "CACHEPROXY_CONFIG=")
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err = cmd.Run()
	return out.String(), errOut.String(), err
}

// upstreamAppSays makes the upstream's narinfo of the app say value for key,
// re-signed with the upstream key: an upstream that serves other metadata.
func upstreamAppSays(t *testing.T, key, value string) func(*fixture) {
	return func(f *fixture) {
		ni := f.Up.Narinfo(t, f.C.App)
		ni.Set(key, value)
		f.Up.Resign(ni, upKey)
		f.Up.PutNarinfo(t, f.C.App, ni)
	}
}

// expectAppRefused checks that a fresh client cannot substitute the app.
func expectAppRefused(t *testing.T, f *fixture) {
	t.Helper()
	if out, err := newClient(t).Substitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App); err == nil {
		t.Fatalf("the client got an unattested app:\n%s", out)
	}
}

// The loop closed by the command: a client is refused an app whose leaf
// nobody rebuilt; `cacheproxy rebuild --once` takes the leaf from the
// queue, builds its deriver here, signs and posts it; the queue is empty and
// the client gets the app.
func TestRebuildCommandAttestsQueue(t *testing.T) {
	t.Parallel()
	f := newFixture(t, "zstd", ProxyConfig{RequireClosure: true}, nil)
	f.Px.Attest(t, attestFile(t, rb1Key, f.C.App))
	cl := newClient(t)
	if out, err := cl.Substitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App); err == nil {
		t.Fatalf("the client got an app whose leaf is unattested:\n%s", out)
	}
	if q := rebuildQueue(t, f.Px); len(q) != 1 || q[0]["store_path"] != string(f.C.Leaf) {
		t.Fatalf("rebuild queue %v, want the leaf", q)
	}
	out, errOut, err := runRebuild(t, f.Px)
	if err != nil {
		t.Fatalf("cacheproxy rebuild --once: %v\nstdout:\n%s\nstderr:\n%s", err, out, errOut)
	}
	if want := "attested\t" + string(f.C.Leaf) + "\n"; out != want {
		t.Fatalf("cacheproxy rebuild --once printed %q, want %q (stderr: %s)", out, want, errOut)
	}
	if q := rebuildQueue(t, f.Px); len(q) != 0 {
		t.Fatalf("rebuild queue after cacheproxy rebuild: %v", q)
	}
	cl.MustSubstitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App)
	if a := f.Px.MustCLI(t, "audit"); !strings.Contains(a, "cacheproxy rebuild") {
		t.Errorf("the audit trail lacks the import's reason \"cacheproxy rebuild\":\n%s", a)
	}
}

// A deriver this machine does not have: the command says so for the path,
// attests nothing and exits non-zero.
func TestRebuildCommandNotInstantiable(t *testing.T) {
	t.Parallel()
	missing := "/nix/store/" + strings.Repeat("0", 32) + "-missing-on-rebuilder.drv"
	f := newFixture(t, "zstd", ProxyConfig{}, upstreamAppSays(t, "Deriver", filepath.Base(missing)))
	expectAppRefused(t, f)
	out, errOut, err := runRebuild(t, f.Px)
	if err == nil {
		t.Fatalf("cacheproxy rebuild --once exited 0 though nothing was attested:\n%s\nstderr:\n%s", out, errOut)
	}
	if want := "not instantiable here\t" + string(f.C.App) + "\n"; out != want {
		t.Fatalf("cacheproxy rebuild --once printed %q, want %q (stderr: %s)", out, want, errOut)
	}
	f.Px.ExpectRejected(t, f.C.App, "unattested")
}

// A deriver that is valid here but does not build: the command says
// "build failed" for the path and exits non-zero.
func TestRebuildCommandBuildFailed(t *testing.T) {
	t.Parallel()
	expr := fmt.Sprintf(`derivation { name = "fails-%s"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "exit 1" ]; nonce = "%d"; }`,
		nonceRe.ReplaceAllString(t.Name(), "_"), time.Now().UnixNano())
	drv := strings.TrimSpace(lastLine(runNix(t, "nix-instantiate", "-E", expr)))
	f := newFixture(t, "zstd", ProxyConfig{}, upstreamAppSays(t, "Deriver", filepath.Base(drv)))
	expectAppRefused(t, f)
	out, errOut, err := runRebuild(t, f.Px)
	if err == nil {
		t.Fatalf("cacheproxy rebuild --once exited 0 though the build failed:\n%s\nstderr:\n%s", out, errOut)
	}
	if want := "build failed\t" + string(f.C.App) + "\n"; out != want {
		t.Fatalf("cacheproxy rebuild --once printed %q, want %q (stderr: %s)", out, want, errOut)
	}
	if !strings.Contains(errOut, drv) || !strings.Contains(errOut, "nix-store --realise") {
		t.Errorf("stderr does not say which build failed:\n%s", errOut)
	}
	f.Px.ExpectRejected(t, f.C.App, "unattested")
}

// A derivation whose output is random: the upstream serves one build, the
// rebuilder's build differs, so it builds once more (--check), which
// differs again. The command says "not reproducible", and the gatekeeper
// shows the attestation_mismatch refusal classified not_reproducible.
func TestRebuildCommandNotReproducible(t *testing.T) {
	t.Parallel()
	expr := fmt.Sprintf(`derivation { name = "random-%s"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "read -r x < /proc/sys/kernel/random/uuid; echo $x > $out" ]; nonce = "%d"; }`,
		nonceRe.ReplaceAllString(t.Name(), "_"), time.Now().UnixNano())
	drv := strings.TrimSpace(lastLine(runNix(t, "nix-instantiate", "-E", expr)))
	rnd := StorePath(strings.TrimSpace(lastLine(runNix(t, "nix-store", "--realise", drv))))
	f := newFixture(t, "zstd", ProxyConfig{}, func(f *fixture) { f.Up.Publish(t, "zstd", rnd) })
	// The upstream keeps its build; the rebuilder must make its own.
	runNix(t, "nix-store", "--delete", string(rnd))
	cl := newClient(t)
	if out, err := cl.Substitute(t, f.Px.URL, f.Px.GatekeeperKey, rnd); err == nil {
		t.Fatalf("the client got an unattested path:\n%s", out)
	}
	out, errOut, err := runRebuild(t, f.Px)
	if err == nil {
		t.Fatalf("cacheproxy rebuild --once exited 0 though nothing was attested:\n%s\nstderr:\n%s", out, errOut)
	}
	if want := "not reproducible\t" + string(rnd) + "\n"; out != want {
		t.Fatalf("cacheproxy rebuild --once printed %q, want %q (stderr: %s)", out, want, errOut)
	}
	f.Px.ExpectRejected(t, rnd, "attestation_mismatch")
	if ex := f.Px.MustCLI(t, "explain", string(rnd), "--json"); !strings.Contains(ex, `"classification": "not_reproducible"`) {
		t.Errorf("explain does not show the classification not_reproducible:\n%s", ex)
	}
}

// The upstream serves (validly signed) another NarHash than the app builds
// to here, and two builds here agree: the command says "differs" and the
// gatekeeper classifies the attestation_mismatch refusal as stable, the
// alarm.
func TestRebuildCommandDiffersStable(t *testing.T) {
	t.Parallel()
	f := newFixture(t, "zstd", ProxyConfig{}, upstreamAppSays(t, "NarHash", sha256Nix32([]byte("not what the app builds to"))))
	expectAppRefused(t, f)
	out, errOut, err := runRebuild(t, f.Px)
	if err == nil {
		t.Fatalf("cacheproxy rebuild --once exited 0 though nothing was attested:\n%s\nstderr:\n%s", out, errOut)
	}
	if want := "differs\t" + string(f.C.App) + "\n"; out != want {
		t.Fatalf("cacheproxy rebuild --once printed %q, want %q (stderr: %s)", out, want, errOut)
	}
	f.Px.ExpectRejected(t, f.C.App, "attestation_mismatch")
	if ex := f.Px.MustCLI(t, "explain", string(f.C.App), "--json"); !strings.Contains(ex, `"classification": "stable"`) {
		t.Errorf("explain does not show the classification stable:\n%s", ex)
	}
}
