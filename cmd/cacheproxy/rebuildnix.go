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

// nixError is a Nix tool that failed: its error message is the last line
// of its standard error (where Nix says what went wrong); the whole of it
// says more, such as the build directories --keep-failed kept.
type nixError struct {
	cmd    string // "nix-store --realise /nix/store/...drv"
	err    error  // exit status
	stderr string
}

func (e *nixError) Error() string {
	msg := strings.TrimSpace(e.stderr)
	if i := strings.LastIndexByte(msg, '\n'); i >= 0 {
		msg = msg[i+1:]
	}
	return fmt.Sprintf("%s: %v: %s", e.cmd, e.err, msg)
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
