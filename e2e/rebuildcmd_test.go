package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// runRebuild runs the real `cacheproxy rebuild --once` against px as
// rebuilder-1, with the fixture side's Nix environment (the local store,
// where buildClosure built the derivations).
func runRebuild(t *testing.T, px *Proxy, extra ...string) (stdout, stderr string, err error) {
	t.Helper()
	return runRebuildEnv(t, px, nil, extra...)
}

// runRebuildEnv is runRebuild with extra environment (TMPDIR, where Nix
// makes its build directories) and flags.
func runRebuildEnv(t *testing.T, px *Proxy, env []string, extra ...string) (stdout, stderr string, err error) {
	t.Helper()
	requireBinary(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, cacheproxyBin, rebuildArgs(px, append([]string{"--once"}, extra...)...)...)
	cmd.Dir = px.Dir
	cmd.Env = append(rebuilderEnv(px), env...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err = cmd.Run()
	return out.String(), errOut.String(), err
}

// rebuilderEnv is a rebuilder's Nix environment: the local store, with
// the gatekeeper as the only substituter and its key the only one trusted,
// as the README asks of a rebuilder's nix.conf.
func rebuilderEnv(px *Proxy) []string {
	return append(filterEnv(nixEnv(nixHome), "CACHEPROXY_CONFIG="),
		"NIX_CONFIG=substituters = "+px.URL+"\ntrusted-public-keys = "+px.GatekeeperKey)
}

// rebuildArgs is the command line of `cacheproxy rebuild` against px as
// rebuilder-1.
func rebuildArgs(px *Proxy, extra ...string) []string {
	return append([]string{"rebuild",
		"--server", px.AdminURL, "--token-file", filepath.Join(px.StateDir, "admin-token"),
		"--key-file", rb1Key.SecFile}, extra...)
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
	f, cl := leafQueued(t)
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
	rnd := randomPath(t)
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

// randomPath builds, on the fixture side, a derivation whose output is
// random, and returns its output.
func randomPath(t *testing.T) StorePath {
	expr := fmt.Sprintf(`derivation { name = "random-%s"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "read -r x < /proc/sys/kernel/random/uuid; echo $x > $out" ]; nonce = "%d"; }`,
		nonceRe.ReplaceAllString(t.Name(), "_"), time.Now().UnixNano())
	drv := strings.TrimSpace(lastLine(runNix(t, "nix-instantiate", "-E", expr)))
	return StorePath(strings.TrimSpace(lastLine(runNix(t, "nix-store", "--realise", drv, "--option", "substituters", ""))))
}

// --keep-diffs with a derivation whose output is random: the rebuild
// differs from the upstream and from itself, and both of the rebuilder's
// NARs are kept under DIR/<hash>-<name>/ (the first build, the --check
// build), named on the path's line. The OUT.check copy and the build
// directory --keep-failed kept are gone.
func TestRebuildCommandKeepDiffs(t *testing.T) {
	t.Parallel()
	rnd := randomPath(t)
	f := newFixture(t, "zstd", ProxyConfig{}, func(f *fixture) { f.Up.Publish(t, "zstd", rnd) })
	runNix(t, "nix-store", "--delete", string(rnd))
	if out, err := newClient(t).Substitute(t, f.Px.URL, f.Px.GatekeeperKey, rnd); err == nil {
		t.Fatalf("the client got an unattested path:\n%s", out)
	}
	diffs, tmp := t.TempDir(), t.TempDir()
	out, errOut, err := runRebuildEnv(t, f.Px, []string{"TMPDIR=" + tmp}, "--keep-diffs", diffs)
	if err == nil {
		t.Fatalf("cacheproxy rebuild --once exited 0 though nothing was attested:\n%s\nstderr:\n%s", out, errOut)
	}
	kept := filepath.Join(diffs, rnd.Base())
	if want := "not reproducible\t" + string(rnd) + "\tdiffs: " + kept + "\n"; out != want {
		t.Fatalf("cacheproxy rebuild --once printed %q, want %q (stderr: %s)", out, want, errOut)
	}
	first, err1 := os.ReadFile(filepath.Join(kept, "1-first-build.nar"))
	second, err2 := os.ReadFile(filepath.Join(kept, "2-check-build.nar"))
	if err1 != nil || err2 != nil || len(first) == 0 || bytes.Equal(first, second) {
		t.Fatalf("kept NARs: %v, %v; the same: %v", err1, err2, bytes.Equal(first, second))
	}
	// Each is a NAR of the path, as nix-store --dump writes it.
	if !bytes.HasPrefix(first, []byte("\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1")) {
		t.Errorf("1-first-build.nar is not a NAR: %q", first[:min(len(first), 32)])
	}
	if dump := runNix(t, "nix-store", "--dump", string(rnd)); dump != string(first) {
		t.Errorf("1-first-build.nar is not the NAR of %s as it is in the store", rnd)
	}
	if left, _ := filepath.Glob(filepath.Join(tmp, "nix-build-*")); len(left) != 0 {
		t.Errorf("build directories left behind: %v", left)
	}
	if _, err := os.Lstat(string(rnd) + ".check"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s.check left behind: %v", rnd, err)
	}
	if !strings.Contains(errOut, "both NARs kept for diffoscope in "+kept) {
		t.Errorf("stderr does not say where the NARs are:\n%s", errOut)
	}
	f.Px.ExpectRejected(t, rnd, "attestation_mismatch")
}

// --instantiate FILE -A ATTR: the queued path's deriver is not in the
// local store (the command says so without the flag); nix-instantiate
// puts it there, and the rebuild attests the path. A file that does not
// evaluate is reported with Nix's message and a non-zero exit.
func TestRebuildCommandInstantiate(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	nixFile := filepath.Join(dir, "fleet.nix")
	src := fmt.Sprintf(`{ tools = { greeting = derivation { name = "greeting-%s"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo hello > $out" ]; nonce = "%d"; }; }; }`,
		nonceRe.ReplaceAllString(t.Name(), "_"), time.Now().UnixNano())
	if err := os.WriteFile(nixFile, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	drv := strings.TrimSpace(lastLine(runNix(t, "nix-instantiate", nixFile, "-A", "tools.greeting")))
	out := StorePath(strings.TrimSpace(lastLine(runNix(t, "nix-store", "--realise", drv, "--option", "substituters", ""))))
	f := newFixture(t, "zstd", ProxyConfig{}, func(f *fixture) { f.Up.Publish(t, "zstd", out) })
	// The rebuilder has neither the output nor its deriver.
	runNix(t, "nix-store", "--delete", string(out))
	runNix(t, "nix-store", "--delete", drv)
	if out, err := newClient(t).Substitute(t, f.Px.URL, f.Px.GatekeeperKey, out); err == nil {
		t.Fatalf("the client got an unattested path:\n%s", out)
	}
	if stdout, errOut, err := runRebuild(t, f.Px); err == nil || stdout != "not instantiable here\t"+string(out)+"\n" {
		t.Fatalf("without --instantiate: %v, printed %q (stderr: %s)", err, stdout, errOut)
	}
	stdout, errOut, err := runRebuild(t, f.Px, "--instantiate", nixFile, "-A", "tools.greeting")
	if err != nil || stdout != "attested\t"+string(out)+"\n" {
		t.Fatalf("with --instantiate: %v, printed %q, want attested (stderr: %s)", err, stdout, errOut)
	}
	newClient(t).MustSubstitute(t, f.Px.URL, f.Px.GatekeeperKey, out)

	broken := filepath.Join(dir, "broken.nix")
	os.WriteFile(broken, []byte("{ x = undefinedThing; }\n"), 0o644)
	stdout, errOut, err = runRebuild(t, f.Px, "--instantiate", broken, "-A", "x")
	if err == nil || !strings.Contains(errOut, "--instantiate "+broken+": nix-instantiate") || !strings.Contains(errOut, "undefinedThing") {
		t.Fatalf("broken --instantiate file: %v, stdout %q, stderr:\n%s", err, stdout, errOut)
	}
}

// Without --once the command passes over the queue every --interval; with
// --jobs 2 it attests the queued leaf, and SIGTERM stops it with exit 0.
func TestRebuildCommandLoopStopsOnSignal(t *testing.T) {
	t.Parallel()
	requireBinary(t)
	f := newFixture(t, "zstd", ProxyConfig{RequireClosure: true}, nil)
	f.Px.Attest(t, attestFile(t, rb1Key, f.C.App))
	if out, err := newClient(t).Substitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App); err == nil {
		t.Fatalf("the client got an app whose leaf is unattested:\n%s", out)
	}
	cmd := exec.Command(cacheproxyBin, rebuildArgs(f.Px, "--interval", "1s", "--jobs", "2")...)
	cmd.Dir = f.Px.Dir
	cmd.Env = rebuilderEnv(f.Px)
	var out, errOut syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
		}
	}()
	eventually(t, time.Minute, func() error {
		if !strings.Contains(out.String(), "attested\t"+string(f.C.Leaf)+"\n") {
			return fmt.Errorf("the loop has not attested the leaf yet:\nstdout %q\nstderr %s", out.String(), errOut.String())
		}
		return nil
	})
	// At least one more pass, over an empty queue, before the signal.
	eventually(t, time.Minute, func() error {
		if strings.Count(errOut.String(), "next pass in 1s") < 1 {
			return fmt.Errorf("no pass summary yet:\n%s", errOut.String())
		}
		return nil
	})
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := <-exited; err != nil {
		t.Fatalf("cacheproxy rebuild after SIGTERM: %v (want exit 0)\nstderr:\n%s", err, errOut.String())
	}
	if !strings.Contains(errOut.String(), "stopping: signal received") {
		t.Errorf("stderr does not say why it stopped:\n%s", errOut.String())
	}
	newClient(t).MustSubstitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App)
}

// --check builds the queued leaf twice with the real Nix (the rebuilder
// does not have it: a build, then `--check --keep-failed`); both builds
// agree, so it is attested, and no build directory is left.
func TestRebuildCommandCheckAttestsReproducible(t *testing.T) {
	t.Parallel()
	f, cl := leafQueued(t)
	runNix(t, "nix-store", "--delete", string(f.C.App), string(f.C.Leaf))
	tmp := t.TempDir()
	out, errOut, err := runRebuildEnv(t, f.Px, []string{"TMPDIR=" + tmp}, "--check")
	if err != nil || out != "attested\t"+string(f.C.Leaf)+"\n" {
		t.Fatalf("cacheproxy rebuild --once --check: %v, printed %q (stderr: %s)", err, out, errOut)
	}
	if left, _ := filepath.Glob(filepath.Join(tmp, "nix-build-*")); len(left) != 0 {
		t.Errorf("build directories left behind: %v", left)
	}
	cl.MustSubstitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App)
}

// leafQueued is a proxy with require_closure whose app is attested and
// whose leaf is not: a client is refused the app, and the leaf waits in
// the rebuild queue. It returns the client that was refused.
func leafQueued(t *testing.T) (*fixture, *Client) {
	t.Helper()
	f := newFixture(t, "zstd", ProxyConfig{RequireClosure: true}, nil)
	f.Px.Attest(t, attestFile(t, rb1Key, f.C.App))
	cl := newClient(t)
	if out, err := cl.Substitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App); err == nil {
		t.Fatalf("the client got an app whose leaf is unattested:\n%s", out)
	}
	return f, cl
}
