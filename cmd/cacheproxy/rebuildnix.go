package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"time"
)

// nixTools is what the rebuilder runs of Nix. execNix runs the real tools;
// unit tests script a fake, the e2e tests run the real ones.
type nixTools interface {
	// run runs a Nix tool and returns its standard output. A failure is
	// a *nixError, which keeps the tool's standard error.
	run(ctx context.Context, tool string, args ...string) (string, error)
	// dump writes path as a NAR to w (nix-store --dump), streaming.
	dump(ctx context.Context, path string, w io.Writer) error
}

// nixError is a Nix tool that failed: its message is what Nix said went
// wrong (see nixMessage); the whole standard error says more, such as the
// build directories --keep-failed kept.
type nixError struct {
	cmd    string // "nix-store --realise /nix/store/...drv"
	err    error  // exit status
	stderr string
}

func (e *nixError) Error() string {
	return fmt.Sprintf("%s: %v: %s", e.cmd, e.err, nixMessage(e.stderr))
}

// nixMessage picks Nix's error out of its standard error: the last line
// that starts with "error:" (a build log or an evaluation error's code
// excerpt may follow it), with the "at FILE:LINE:COL:" line that places an
// evaluation error; else the last line.
func nixMessage(stderr string) string {
	lines := strings.Split(strings.TrimSpace(stderr), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if !strings.HasPrefix(lines[i], "error:") {
			continue
		}
		msg := strings.TrimSpace(lines[i])
		for _, l := range lines[i+1 : min(i+4, len(lines))] {
			if l = strings.TrimSpace(l); strings.HasPrefix(l, "at ") {
				msg += " (" + strings.TrimSuffix(l, ":") + ")"
				break
			}
		}
		return msg
	}
	return strings.TrimSpace(lines[len(lines)-1])
}

func (e *nixError) Unwrap() error { return e.err }

// keptBuildDirRe matches Nix's note on a build directory --keep-failed
// kept (Nix 2.8 to 2.2x: "note: keeping build directory '/tmp/nix-build-…'").
var keptBuildDirRe = regexp.MustCompile(`keeping build directory '([^']+)'`)

// keptBuildDirs are the build directories a failed Nix command kept.
func keptBuildDirs(err error) []string {
	var ne *nixError
	if !errors.As(err, &ne) {
		return nil
	}
	var dirs []string
	for _, m := range keptBuildDirRe.FindAllStringSubmatch(ne.stderr, -1) {
		dirs = append(dirs, m[1])
	}
	return dirs
}

// execNix runs the Nix tools on PATH.
type execNix struct{}

// nixStopGrace is how long a Nix tool has to stop after an interrupt
// (it removes its build directories and locks) before it is killed.
const nixStopGrace = 30 * time.Second

func (execNix) command(ctx context.Context, tool string, args ...string) *exec.Cmd {
	if tool == "nix" {
		args = append([]string{"--extra-experimental-features", "nix-command"}, args...)
	}
	cmd := exec.CommandContext(ctx, tool, args...)
	// Interrupted (SIGINT/SIGTERM to the rebuilder), Nix is asked to stop
	// as on Ctrl-C, so that it cleans up; killed only if it does not.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGINT) }
	cmd.WaitDelay = nixStopGrace
	return cmd
}

func (e execNix) run(ctx context.Context, tool string, args ...string) (string, error) {
	cmd := e.command(ctx, tool, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), &nixError{cmd: tool + " " + strings.Join(args, " "), err: err, stderr: stderr.String()}
	}
	return stdout.String(), nil
}

func (e execNix) dump(ctx context.Context, path string, w io.Writer) error {
	cmd := e.command(ctx, "nix-store", "--dump", path)
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = w, &stderr
	if err := cmd.Run(); err != nil {
		return &nixError{cmd: "nix-store --dump " + path, err: err, stderr: stderr.String()}
	}
	return nil
}
