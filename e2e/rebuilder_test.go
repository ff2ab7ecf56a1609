package e2e

// The rebuilder workflow of the README, end to end: the fleet is refused a
// closure nobody rebuilt, `rejections --derivers` names what to rebuild, a
// real nix-build runs contrib/rebuilder/post-build-hook.sh for each path
// it builds, which signs the outputs with the rebuilder key and posts them
// to the admin API with the rebuilder's own named token; the proxy then
// approves the closure, and the audit trail names the rebuilder. The admin
// API speaks HTTPS with a self-signed certificate, as the README sets it up.

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/testcert"
)

// selfSigned writes a self-signed certificate for localhost and its key.
func selfSigned(t *testing.T) (certFile, keyFile string) {
	p := testcert.Write(t, "admin", "localhost")
	return p.CertFile, p.KeyFile
}

func TestRebuilderPostBuildHook(t *testing.T) {
	t.Parallel()
	c := buildClosure(t, ClosureOpts{})
	up := newUpstream(t, upKey)
	up.Publish(t, "zstd", c.App)

	// The rebuilder's own token, named in the config.
	tokenFile := filepath.Join(t.TempDir(), "rebuilder.token")
	if err := os.WriteFile(tokenFile, []byte("rebuilder-token-"+strconv.FormatInt(time.Now().UnixNano(), 36)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, key := selfSigned(t)
	// Extra continues the [admin] table the harness writes last.
	px := startProxy(t, ProxyConfig{Upstreams: []UpstreamSpec{up.Spec()}, Attesters: []*Key{rb1Key},
		Extra: "tls_cert_file = " + tomlStr(cert) + "\ntls_key_file = " + tomlStr(key) + "\n\n" +
			"[[admin.tokens]]\nname = \"nightly-rebuilder\"\nfile = " + tomlStr(tokenFile) + "\n"})
	adminURL := "https://localhost:" + px.AdminAddr[strings.LastIndex(px.AdminAddr, ":")+1:]

	// The fleet is refused; the operator lists what to rebuild.
	px.ExpectRejected(t, c.App, "unattested")
	px.ExpectRejected(t, c.Leaf, "unattested")
	drvs := px.MustCLI(t, "rejections", "--derivers")
	for _, d := range []StorePath{c.AppDrv, c.LeafDrv} {
		if !strings.Contains(drvs, string(d)) {
			t.Fatalf("rejections --derivers lacks %s:\n%s", d, drvs)
		}
	}

	// The rebuilder builds from source: the outputs go, the derivations
	// stay, and nix-build runs the hook after each build.
	runNix(t, "nix-store", "--delete", string(c.App), string(c.Leaf))
	hook := filepath.Join(moduleRoot, "contrib", "rebuilder", "post-build-hook.sh")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nix-build", "--no-out-link", filepath.Join(moduleRoot, "e2e", "testdata", "closure.nix"),
		"--argstr", "nonce", c.Nonce, "--arg", "bigSize", "0",
		"--option", "substituters", "", "--option", "post-build-hook", hook)
	cmd.Env = append(nixEnv(nixHome),
		"CACHEPROXY_HOOK_CONFIG=/nonexistent",
		"CACHEPROXY_ADMIN_URL="+adminURL,
		"CACHEPROXY_CA_FILE="+cert,
		"CACHEPROXY_TOKEN_FILE="+tokenFile,
		"CACHEPROXY_REBUILDER_KEY_FILE="+rb1Key.SecFile,
	)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("nix-build with the post-build-hook: %v\n%s", err, out)
	}
	if got := StorePath(strings.TrimSpace(lastLine(string(out)))); got != c.App {
		t.Fatalf("the rebuild gave %s, want %s (not reproducible?)\n%s", got, c.App, out)
	}
	for _, p := range c.Paths() {
		if !strings.Contains(string(out), "attested "+string(p)) {
			t.Errorf("the hook did not report attesting %s:\n%s", p, out)
		}
	}

	// The proxy approves by attestation, and the fleet gets the closure.
	px.expectApproval(t, c.App, "attested")
	px.expectApproval(t, c.Leaf, "attested")
	newClient(t).MustSubstitute(t, px.URL, px.GatekeeperKey, c.App)

	// The audit trail says who: the rebuilder's token name, with the
	// derivation it built as the reason.
	audit := px.MustCLI(t, "audit")
	for _, p := range []StorePath{c.Leaf, c.App} {
		var line string
		for _, l := range strings.Split(audit, "\n") {
			if strings.Contains(l, string(p)) {
				line = l
			}
		}
		for _, want := range []string{"nightly-rebuilder", "attest_import", " ok ", "post-build-hook: built /nix/store/", "stored=1"} {
			if !strings.Contains(line, want) {
				t.Errorf("audit line for %s lacks %q:\n%s", p.Name(), want, audit)
			}
		}
	}
	if logs := px.Logs(); !strings.Contains(logs, "who=nightly-rebuilder action=attest_import outcome=ok") {
		t.Errorf("no structured log line for the hook's import:\n%s", logs)
	}
}

// The hook refuses to send its token in clear text off this machine, and
// fails the build loudly when the proxy stores nothing (a key that is not
// an attester).
func TestRebuilderHookRefuses(t *testing.T) {
	t.Parallel()
	c := buildClosure(t, ClosureOpts{})
	up := newUpstream(t, upKey)
	up.Publish(t, "none", c.Leaf)
	px := startProxy(t, ProxyConfig{Upstreams: []UpstreamSpec{up.Spec()}, Attesters: []*Key{rb1Key}})
	tokenFile := filepath.Join(px.StateDir, "admin-token")
	hook := filepath.Join(moduleRoot, "contrib", "rebuilder", "post-build-hook.sh")
	run := func(url string, key *Key) (string, error) {
		cmd := exec.Command(hook)
		cmd.Env = append(nixEnv(nixHome), "CACHEPROXY_HOOK_CONFIG=/nonexistent", "OUT_PATHS="+string(c.Leaf),
			"DRV_PATH="+string(c.LeafDrv), "CACHEPROXY_ADMIN_URL="+url, "CACHEPROXY_TOKEN_FILE="+tokenFile,
			"CACHEPROXY_REBUILDER_KEY_FILE="+key.SecFile)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := run("http://cacheproxy.example:5481", rb1Key); err == nil || !strings.Contains(out, "in clear text") {
		t.Errorf("hook to a remote http URL: %v\n%s", err, out)
	}
	if out, err := run(px.AdminURL, strangerKey); err == nil || !strings.Contains(out, "no_attester_signature") {
		t.Errorf("hook with a key that is not an attester: %v\n%s", err, out)
	}
	px.ExpectRejected(t, c.Leaf, "unattested")
	if out, err := run(px.AdminURL, rb1Key); err != nil {
		t.Fatalf("hook run by hand: %v\n%s", err, out)
	}
	px.ExpectApproved(t, c.Leaf)
	if audit := px.MustCLI(t, "audit"); !strings.Contains(audit, "admin  ") || !strings.Contains(audit, "no_attester_signature=1") {
		t.Errorf("audit does not show both imports by the default token:\n%s", audit)
	}
}
