package server

import (
	"bytes"
	"context"
	"image/png"
	"os"
	"os/exec"
	"testing"
	"time"
)

// chromium returns the headless browser, skipping the test without one
// (failing instead when CI is set: there the browser test must run).
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("the status page browser test needs Debian's chromium (apt-get install chromium); CI is set, refusing to skip")
	}
	t.Skip("SKIP: the status page browser test needs Debian's chromium (apt-get install chromium); not on PATH")
	return ""
}

// runChromium runs a headless browser on url with extra flags and returns
// its stdout. Its profile lives in a temp dir, and it never talks to the
// network beyond url.
func runChromium(t *testing.T, bin, url string, flags ...string) []byte {
	t.Helper()
	// Generous: a loaded 2-core machine starts the browser slowly.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	args := append([]string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
		"--no-first-run", "--disable-extensions", "--disable-background-networking", "--disable-sync",
		"--user-data-dir=" + t.TempDir()}, flags...)
	cmd := exec.CommandContext(ctx, bin, append(args, url)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.Env = append(os.Environ(), "DBUS_SESSION_BUS_ADDRESS=disabled:")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s: %v\n%s", bin, err, stderr.Bytes())
	}
	return out
}

// The status page as a browser builds it, from a running proxy that has
// made decisions: what it displays, and that it displays nothing it must
// not. A phone-sized screenshot shows it renders at that width.
func TestStatusPageInBrowser(t *testing.T) {
	bin := chromium(t)
	sc := newStatusScenario(t)
	dom := runChromium(t, bin, sc.f.url("/"), "--dump-dom")
	if !bytes.Contains(dom, []byte(`<section id="decisions">`)) {
		t.Fatalf("the browser did not build the page:\n%s", dom)
	}
	sc.checkStatusPage(t, string(dom))

	shot := t.TempDir() + "/status.png"
	if p := os.Getenv("CACHEPROXY_STATUS_SCREENSHOT"); p != "" {
		shot = p // keep it, to look at
	}
	runChromium(t, bin, sc.f.url("/"), "--window-size=390,844", "--hide-scrollbars", "--screenshot="+shot)
	f, err := os.Open(shot)
	if err != nil {
		t.Fatalf("no screenshot: %v", err)
	}
	defer f.Close()
	img, err := png.DecodeConfig(f)
	if err != nil || img.Width != 390 {
		t.Errorf("screenshot: %+v, %v; want a 390 px wide PNG", img, err)
	}
}
