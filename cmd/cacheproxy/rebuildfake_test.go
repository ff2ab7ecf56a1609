package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
)

// fakeNix answers the Nix commands a test scripts, by their command line;
// any other command fails the test. NAR dumps are the file's bytes.
type fakeNix struct {
	t    *testing.T
	mu   sync.Mutex
	cmds map[string]func() (string, error)
	ran  []string
}

func (f *fakeNix) on(cmd string, answer func() (string, error)) { f.cmds[cmd] = answer }

func (f *fakeNix) run(ctx context.Context, tool string, args ...string) (string, error) {
	cmd := tool + " " + strings.Join(args, " ")
	f.mu.Lock()
	f.ran = append(f.ran, cmd)
	answer, ok := f.cmds[cmd]
	f.mu.Unlock()
	if !ok {
		f.t.Errorf("unexpected Nix command: %s", cmd)
		return "", &nixError{cmd: cmd, err: errors.New("exit status 1"), stderr: "error: not scripted"}
	}
	return answer()
}

func (f *fakeNix) dump(ctx context.Context, path string, w io.Writer) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

func (f *fakeNix) ranCmd(cmd string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.ran {
		if c == cmd {
			return true
		}
	}
	return false
}

func ok(out string) func() (string, error) { return func() (string, error) { return out, nil } }

func fail(stderr string) func() (string, error) {
	return func() (string, error) {
		return "", &nixError{cmd: "nix", err: errors.New("exit status 1"), stderr: stderr}
	}
}

// stubGatekeeper is the admin API as the rebuilder sees it: a fixed queue,
// the upstream NarHash of each path (explain), and the attestations
// posted to it, each answered "stored".
type stubGatekeeper struct {
	mu       sync.Mutex
	queue    []adminapi.QueueEntry
	upstream map[string]string // store path -> NarHash
	posted   []map[string]any
	passes   int
}

func (g *stubGatekeeper) start(t *testing.T) *adminapi.Client {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		g.mu.Lock()
		defer g.mu.Unlock()
		switch {
		case r.Method == http.MethodGet && r.URL.Path == adminapi.PathRebuildQueue:
			g.passes++
			json.NewEncoder(w).Encode(adminapi.RebuildQueue{Paths: g.queue})
		case r.Method == http.MethodGet && strings.HasPrefix(r.URL.Path, adminapi.PathExplain):
			ex := adminapi.Explain{Status: "rejected"}
			for p, h := range g.upstream {
				if filepath.Base(p) == strings.TrimPrefix(r.URL.Path, adminapi.PathExplain) {
					ex.Stored = &adminapi.Stored{NarHash: h}
				}
			}
			json.NewEncoder(w).Encode(ex)
		case r.Method == http.MethodPost && r.URL.Path == adminapi.PathAttestations:
			var entries []map[string]any
			if err := json.NewDecoder(r.Body).Decode(&entries); err != nil {
				http.Error(w, err.Error(), 400)
				return
			}
			resp := adminapi.AttestResponse{Counts: map[string]int{}}
			for _, e := range entries {
				g.posted = append(g.posted, e)
				resp.Results = append(resp.Results, adminapi.AttestResult{Path: e["path"].(string), Status: adminapi.AttestStored, Key: "rebuilder-1"})
			}
			json.NewEncoder(w).Encode(resp)
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	token := filepath.Join(t.TempDir(), "token")
	os.WriteFile(token, []byte("0123456789abcdef0123456789abcdef\n"), 0o600)
	c, err := adminapi.NewClient(srv.URL, token, nil)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func (g *stubGatekeeper) postedEntries() []map[string]any {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]map[string]any(nil), g.posted...)
}

// rebuildFixture is one derivation with one output, as files: the output
// in a store directory of the test's own, and its deriver.
type rebuildFixture struct {
	store, drv, out string
	nix             *fakeNix
	gk              *stubGatekeeper
	r               *rebuilder
	stdout, stderr  *bytes.Buffer
}

func newRebuildFixture(t *testing.T, name, content string) *rebuildFixture {
	store := t.TempDir()
	f := &rebuildFixture{store: store,
		drv:    filepath.Join(store, "dddddddddddddddddddddddddddddddd-"+name+".drv"),
		out:    filepath.Join(store, "oooooooooooooooooooooooooooooooo-"+name),
		nix:    &fakeNix{t: t, cmds: map[string]func() (string, error){}},
		gk:     &stubGatekeeper{upstream: map[string]string{}},
		stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{}}
	f.gk.queue = []adminapi.QueueEntry{{StorePath: f.out, Deriver: f.drv, Reason: "unattested", Requests: 1}}
	// The first build makes the output; it is not valid before.
	f.nix.on("nix-store --check-validity "+f.drv, ok(""))
	f.nix.on("nix-store --query --outputs "+f.drv, ok(f.out+"\n"))
	f.nix.on("nix-store --check-validity "+f.out, fail("error: path '"+f.out+"' is not valid"))
	f.nix.on("nix-store --realise "+f.drv, func() (string, error) {
		return f.out + "\n", os.WriteFile(f.out, []byte(content), 0o644)
	})
	f.nix.on("nix store sign --key-file rebuilder-1.sec "+f.out, ok(""))
	f.nix.on("nix path-info --json --sigs "+f.out, func() (string, error) {
		return fmt.Sprintf(`[{"path":%q,"narHash":%q,"narSize":%d,"signatures":["rebuilder-1:sig"]}]`, f.out, narHashOf(content), len(content)), nil
	})
	f.r = &rebuilder{client: f.gk.start(t), keyFile: "rebuilder-1.sec", keyName: "rebuilder-1", nix: f.nix, jobs: 1,
		out: f.stdout, log: f.stderr}
	return f
}

func narHashOf(content string) string {
	h := sha256.Sum256([]byte(content))
	return narinfo.FormatHash("sha256", h[:])
}

// secondBuildDiffers scripts `--check --keep-failed` as Nix 2.8 answers a
// build that came out differently: OUT.check holds the second build, the
// build directory is kept, and the error says "may not be deterministic".
// It returns the build directory.
func (f *rebuildFixture) secondBuildDiffers(t *testing.T, content string) string {
	tmp := t.TempDir()
	buildDir := filepath.Join(tmp, "nix-build-"+storeName(f.drv)+"-0")
	f.nix.on("nix-store --realise --check --keep-failed "+f.drv, func() (string, error) {
		if err := os.WriteFile(f.out+".check", []byte(content), 0o644); err != nil {
			return "", err
		}
		if err := os.MkdirAll(filepath.Join(buildDir, "src"), 0o755); err != nil {
			return "", err
		}
		return fail("checking outputs of '" + f.drv + "'...\nnote: keeping build directory '" + buildDir + "'\n" +
			"error: derivation '" + f.drv + "' may not be deterministic: output '" + f.out + "' differs from '" + f.out + ".check'")()
	})
	return buildDir
}

// A rebuild that differs from the upstream and from itself: both NARs are
// kept under --keep-diffs DIR/<hash>-<name>/ with names saying which build
// each is, the line names the directory, the report carries both builds'
// hashes, and the OUT.check copy and the kept build directory are gone.
func TestRebuildKeepDiffs(t *testing.T) {
	f := newRebuildFixture(t, "random", "first build\n")
	f.gk.upstream[f.out] = narHashOf("the upstream's build\n")
	buildDir := f.secondBuildDiffers(t, "second build\n")
	f.r.keepDiffs = t.TempDir()
	if err := f.r.once(context.Background()); err == nil {
		t.Fatalf("once: no error though nothing was attested\n%s", f.stderr)
	}
	kept := filepath.Join(f.r.keepDiffs, filepath.Base(f.out))
	if want := "not reproducible\t" + f.out + "\tdiffs: " + kept + "\n"; f.stdout.String() != want {
		t.Fatalf("stdout %q, want %q\nstderr:\n%s", f.stdout, want, f.stderr)
	}
	for name, want := range map[string]string{"1-first-build.nar": "first build\n", "2-check-build.nar": "second build\n"} {
		if got, err := os.ReadFile(filepath.Join(kept, name)); err != nil || string(got) != want {
			t.Errorf("%s: %q, %v; want %q", name, got, err, want)
		}
	}
	for _, gone := range []string{f.out + ".check", buildDir} {
		if _, err := os.Lstat(gone); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind: %v", gone, err)
		}
	}
	posted := f.gk.postedEntries()
	if len(posted) != 1 {
		t.Fatalf("posted %v", posted)
	}
	rep, _ := json.Marshal(posted[0]["cacheproxy"])
	want := fmt.Sprintf(`{"builds":[{"narHash":%q,"narSize":12},{"narHash":%q,"narSize":13}],"classification":"not_reproducible","upstreamNarHash":%q}`,
		narHashOf("first build\n"), narHashOf("second build\n"), narHashOf("the upstream's build\n"))
	if string(rep) != want {
		t.Errorf("report %s\nwant   %s", rep, want)
	}
	if !strings.Contains(f.stderr.String(), "both NARs kept for diffoscope in "+kept) {
		t.Errorf("stderr does not name the kept NARs:\n%s", f.stderr)
	}
}

// Without --keep-diffs nothing is kept, and the leftovers go all the same.
func TestRebuildNoKeepDiffsCleansUp(t *testing.T) {
	f := newRebuildFixture(t, "random", "first build\n")
	f.gk.upstream[f.out] = narHashOf("the upstream's build\n")
	buildDir := f.secondBuildDiffers(t, "second build\n")
	f.r.once(context.Background())
	if want := "not reproducible\t" + f.out + "\n"; f.stdout.String() != want {
		t.Fatalf("stdout %q, want %q\nstderr:\n%s", f.stdout, want, f.stderr)
	}
	for _, gone := range []string{f.out + ".check", buildDir} {
		if _, err := os.Lstat(gone); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind: %v", gone, err)
		}
	}
}

// A build directory Nix's message names that is not this derivation's
// (the builder can print anything) is left alone.
func TestRebuildCleanupOnlyOwnBuildDirs(t *testing.T) {
	f := newRebuildFixture(t, "random", "x")
	other := filepath.Join(t.TempDir(), "precious")
	os.MkdirAll(other, 0o755)
	err := &nixError{cmd: "nix-store", err: errors.New("exit status 1"), stderr: "note: keeping build directory '" + other + "'\n"}
	f.r.cleanup(f.drv, err, nil)
	if _, err := os.Stat(other); err != nil {
		t.Fatalf("cleanup removed a directory that is not a build directory of %s: %v", f.drv, err)
	}
	if !strings.Contains(f.stderr.String(), "not removing") {
		t.Errorf("stderr does not say what it left alone:\n%s", f.stderr)
	}
}

// --check builds a second time even when the upstream matches: an output
// both builds agree on is attested; one they disagree on is "not
// reproducible" and not posted (there is no mismatch for it to label).
func TestRebuildCheckFlag(t *testing.T) {
	t.Run("agree", func(t *testing.T) {
		f := newRebuildFixture(t, "hello", "hello\n")
		f.gk.upstream[f.out] = narHashOf("hello\n")
		f.nix.on("nix-store --realise --check --keep-failed "+f.drv, ok(f.out+"\n"))
		f.r.check = true
		if err := f.r.once(context.Background()); err != nil {
			t.Fatalf("once: %v\n%s", err, f.stderr)
		}
		if want := "attested\t" + f.out + "\n"; f.stdout.String() != want {
			t.Fatalf("stdout %q, want %q", f.stdout, want)
		}
		if !f.nix.ranCmd("nix-store --realise --check --keep-failed " + f.drv) {
			t.Error("--check did not build a second time")
		}
		if p := f.gk.postedEntries(); len(p) != 1 || p[0]["cacheproxy"] != nil {
			t.Errorf("posted %v, want the entry without a report", p)
		}
	})
	t.Run("disagree", func(t *testing.T) {
		f := newRebuildFixture(t, "hello", "hello\n")
		f.gk.upstream[f.out] = narHashOf("hello\n")
		buildDir := f.secondBuildDiffers(t, "hello again\n")
		f.r.check = true
		if err := f.r.once(context.Background()); err == nil {
			t.Fatal("once: no error though nothing was attested")
		}
		if want := "not reproducible\t" + f.out + "\n"; f.stdout.String() != want {
			t.Fatalf("stdout %q, want %q\n%s", f.stdout, want, f.stderr)
		}
		if p := f.gk.postedEntries(); len(p) != 0 {
			t.Errorf("posted %v, want nothing", p)
		}
		if _, err := os.Lstat(buildDir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind", buildDir)
		}
	})
	t.Run("off", func(t *testing.T) {
		f := newRebuildFixture(t, "hello", "hello\n")
		f.gk.upstream[f.out] = narHashOf("hello\n")
		if err := f.r.once(context.Background()); err != nil {
			t.Fatalf("once: %v\n%s", err, f.stderr)
		}
		if f.nix.ranCmd("nix-store --realise --check --keep-failed " + f.drv) {
			t.Error("built a second time without --check, though the upstream matched")
		}
	})
}

// --instantiate runs nix-instantiate FILE -A ATTR... before reading the
// queue; when it fails the pass says so, goes on, and --once exits 1.
func TestRebuildInstantiate(t *testing.T) {
	f := newRebuildFixture(t, "hello", "hello\n")
	f.gk.upstream[f.out] = narHashOf("hello\n")
	f.r.instantiate, f.r.attrs = "/src/fleet.nix", []string{"hello", "tools.jq"}
	f.nix.on("nix-instantiate /src/fleet.nix -A hello -A tools.jq", ok(f.drv+"\n"))
	if err := f.r.once(context.Background()); err != nil {
		t.Fatalf("once: %v\n%s", err, f.stderr)
	}
	if f.nix.ran[0] != "nix-instantiate /src/fleet.nix -A hello -A tools.jq" {
		t.Errorf("first Nix command %q, want the nix-instantiate", f.nix.ran[0])
	}

	g := newRebuildFixture(t, "hello", "hello\n")
	g.gk.queue = nil
	g.r.instantiate = "/src/broken.nix"
	g.nix.on("nix-instantiate /src/broken.nix", fail("error: undefined variable 'hellp' at /src/broken.nix:3:5"))
	err := g.r.once(context.Background())
	if err == nil {
		t.Fatal("once: no error though nix-instantiate failed")
	}
	if !strings.Contains(g.stderr.String(), "--instantiate /src/broken.nix: ") || !strings.Contains(g.stderr.String(), "undefined variable 'hellp'") {
		t.Errorf("stderr does not say what nix-instantiate said:\n%s", g.stderr)
	}
}

// The long-running mode passes over the queue, waits the interval, passes
// again, and stops cleanly (nil) when its context ends (a signal).
func TestRebuildLoop(t *testing.T) {
	f := newRebuildFixture(t, "hello", "hello\n")
	f.gk.queue = nil
	ctx, cancel := context.WithCancel(context.Background())
	waits := 0
	after := func(d time.Duration) <-chan time.Time {
		waits++
		if d != 90*time.Second {
			t.Errorf("waits %s, want the interval 90s", d)
		}
		c := make(chan time.Time, 1)
		if waits == 3 {
			cancel() // the signal comes during the third wait
		} else {
			c <- time.Time{}
		}
		return c
	}
	if err := f.r.loop(ctx, 90*time.Second, after); err != nil {
		t.Fatalf("loop stopped with %v", err)
	}
	if f.gk.passes != 3 {
		t.Errorf("%d passes over the queue, want 3", f.gk.passes)
	}
	if !strings.Contains(f.stderr.String(), "stopping: signal received") {
		t.Errorf("stderr: %s", f.stderr)
	}
}

// In the long-running mode a derivation that failed to build is not built
// again at the next pass, but after an hour, then two, and so on; one that
// builds is forgotten. The queue keeps naming it all along.
func TestRebuildLoopBacksOffFailedBuilds(t *testing.T) {
	f := newRebuildFixture(t, "broken", "")
	builds := 0
	f.nix.on("nix-store --realise "+f.drv, func() (string, error) {
		builds++
		return fail("error: builder for '" + f.drv + "' failed with exit code 1")()
	})
	clock := time.Date(2026, 3, 1, 8, 0, 0, 0, time.UTC)
	f.r.now = func() time.Time { return clock }
	ctx, cancel := context.WithCancel(context.Background())
	// Each wait advances the clock by the step; the builds seen after each
	// pass are what the test expects.
	steps := []struct {
		advance time.Duration
		builds  int
	}{
		{5 * time.Minute, 1},  // first pass: built, failed
		{50 * time.Minute, 1}, // 8:05: waiting
		{10 * time.Minute, 1}, // 8:55: waiting
		{90 * time.Minute, 2}, // 9:05: an hour on: built again, failed; next in two hours
		{time.Hour, 2},        // 10:35: waiting
		{0, 3},                // 11:35: built again
	}
	i := 0
	after := func(time.Duration) <-chan time.Time {
		if builds != steps[i].builds {
			t.Errorf("after pass %d (%s): %d builds, want %d", i+1, clock.Format("15:04"), builds, steps[i].builds)
		}
		clock = clock.Add(steps[i].advance)
		i++
		c := make(chan time.Time, 1)
		if i == len(steps) {
			cancel()
		} else {
			c <- clock
		}
		return c
	}
	if err := f.r.loop(ctx, 5*time.Minute, after); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(f.stderr.String(), "1 waiting to retry a failed build") {
		t.Errorf("the pass summaries do not count the waiting path:\n%s", f.stderr)
	}
}

// An output already valid here (substituted, or built before) is built
// again with --check rather than signed as it is; when that build differs,
// the path is "not reproducible", nothing is posted, and --keep-diffs
// keeps the store's copy (1-in-store.nar) and the new build.
func TestRebuildValidOutputCheckDiffers(t *testing.T) {
	f := newRebuildFixture(t, "random", "")
	if err := os.WriteFile(f.out, []byte("in the store\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	f.nix.on("nix-store --check-validity "+f.out, ok(""))
	buildDir := f.secondBuildDiffers(t, "built here\n")
	f.r.keepDiffs = t.TempDir()
	if err := f.r.once(context.Background()); err == nil {
		t.Fatal("once: no error though nothing was attested")
	}
	kept := filepath.Join(f.r.keepDiffs, filepath.Base(f.out))
	if want := "not reproducible\t" + f.out + "\tdiffs: " + kept + "\n"; f.stdout.String() != want {
		t.Fatalf("stdout %q, want %q\nstderr:\n%s", f.stdout, want, f.stderr)
	}
	for name, want := range map[string]string{"1-in-store.nar": "in the store\n", "2-check-build.nar": "built here\n"} {
		if got, err := os.ReadFile(filepath.Join(kept, name)); err != nil || string(got) != want {
			t.Errorf("%s: %q, %v; want %q", name, got, err, want)
		}
	}
	if p := f.gk.postedEntries(); len(p) != 0 {
		t.Errorf("posted %v", p)
	}
	if f.nix.ranCmd("nix-store --realise " + f.drv) {
		t.Error("a plain --realise, which would build nothing, instead of --check")
	}
	for _, gone := range []string{f.out + ".check", buildDir} {
		if _, err := os.Lstat(gone); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind: %v", gone, err)
		}
	}
}

// Nix stops comparing a --check build at the first output that differs:
// of a derivation with two outputs, one without OUT.check was perhaps not
// compared. Both are not_reproducible (the derivation is), only the
// compared one has its NARs kept, and both reports are posted, with
// --check too (a report labels a mismatch; it approves nothing).
func TestRebuildNondeterministicIsPerDerivation(t *testing.T) {
	for _, check := range []bool{false, true} {
		t.Run(fmt.Sprintf("check=%v", check), func(t *testing.T) {
			f := newRebuildFixture(t, "multi", "out 1\n")
			dev := f.out + "-dev"
			f.gk.queue = append(f.gk.queue, adminapi.QueueEntry{StorePath: dev, Deriver: f.drv, Reason: "unattested"})
			f.gk.upstream[f.out] = narHashOf("upstream out\n")
			f.gk.upstream[dev] = narHashOf("upstream dev\n")
			f.nix.on("nix-store --query --outputs "+f.drv, ok(f.out+"\n"+dev+"\n"))
			f.nix.on("nix-store --check-validity "+f.out+" "+dev, fail("error: path '"+f.out+"' is not valid"))
			f.nix.on("nix-store --realise "+f.drv, func() (string, error) {
				os.WriteFile(dev, []byte("dev 1\n"), 0o644)
				return f.out + "\n" + dev + "\n", os.WriteFile(f.out, []byte("out 1\n"), 0o644)
			})
			both := f.out + " " + dev
			f.nix.on("nix store sign --key-file rebuilder-1.sec "+both, ok(""))
			f.nix.on("nix path-info --json --sigs "+both, ok(fmt.Sprintf(`[{"path":%q,"narHash":%q,"narSize":6},{"path":%q,"narHash":%q,"narSize":6}]`,
				f.out, narHashOf("out 1\n"), dev, narHashOf("dev 1\n"))))
			f.secondBuildDiffers(t, "out 2\n") // only out has OUT.check
			f.r.check, f.r.keepDiffs = check, t.TempDir()
			f.r.once(context.Background())
			kept := filepath.Join(f.r.keepDiffs, filepath.Base(f.out))
			want := "not reproducible\t" + f.out + "\tdiffs: " + kept + "\nnot reproducible\t" + dev + "\n"
			if f.stdout.String() != want {
				t.Fatalf("stdout %q, want %q\nstderr:\n%s", f.stdout, want, f.stderr)
			}
			for _, e := range f.gk.postedEntries() {
				if rep, _ := e["cacheproxy"].(map[string]any); rep["classification"] != "not_reproducible" {
					t.Errorf("%s posted with report %v", e["path"], rep)
				}
			}
			if n := len(f.gk.postedEntries()); n != 2 {
				t.Errorf("%d entries posted, want both: the reports label their mismatches", n)
			}
		})
	}
}

// Where the rebuilder may not write the store (NixOS mounts it read-only;
// the service unit does too), the daemon deletes OUT.check.
func TestRebuildCleanupThroughTheDaemon(t *testing.T) {
	f := newRebuildFixture(t, "random", "first build\n")
	f.gk.upstream[f.out] = narHashOf("the upstream's build\n")
	f.secondBuildDiffers(t, "second build\n")
	f.r.removeAll = func(p string) error {
		if strings.HasSuffix(p, ".check") {
			return &os.PathError{Op: "unlinkat", Path: p, Err: errors.New("read-only file system")}
		}
		return os.RemoveAll(p)
	}
	f.nix.on("nix-store --delete "+f.out+".check", func() (string, error) { return "", os.Remove(f.out + ".check") })
	f.r.once(context.Background())
	if !f.nix.ranCmd("nix-store --delete " + f.out + ".check") {
		t.Errorf("OUT.check was not deleted through Nix\n%s", f.stderr)
	}
	if _, err := os.Lstat(f.out + ".check"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("OUT.check left behind: %v", err)
	}
}
