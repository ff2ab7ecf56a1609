// Package sdnotify speaks systemd's service notification protocol
// (sd_notify(3)) directly: each state change is one datagram of
// newline-separated KEY=VALUE lines sent to the unix socket named by
// $NOTIFY_SOCKET. It lets a Type=notify unit start dependants only once the
// proxy can serve, show a one-line status in `systemctl status`, and tell
// reloads and shutdowns apart from crashes.
//
// Trust model: the socket is the service manager's; nothing is read back.
// Without $NOTIFY_SOCKET (not run by systemd, or Type=simple) every call is
// a no-op, so callers notify unconditionally.
package sdnotify

import (
	"fmt"
	"net"
	"strings"
)

// EnvVar is the variable systemd sets for Type=notify services.
const EnvVar = "NOTIFY_SOCKET"

// Notifier sends to one notification socket. The zero value and nil
// notify nothing.
type Notifier struct {
	addr *net.UnixAddr
}

// New returns a Notifier for socket, the value of $NOTIFY_SOCKET: a path,
// or an abstract socket name starting with '@' (Go's unix sockets turn the
// leading '@' into the NUL byte of the abstract namespace, as systemd
// means it). "" gives a Notifier that sends nothing.
func New(socket string) (*Notifier, error) {
	if socket == "" {
		return &Notifier{}, nil
	}
	if !strings.HasPrefix(socket, "/") && !strings.HasPrefix(socket, "@") {
		return nil, fmt.Errorf("%s=%q: want an absolute path or an abstract name starting with @", EnvVar, socket)
	}
	return &Notifier{addr: &net.UnixAddr{Name: socket, Net: "unixgram"}}, nil
}

// Enabled reports whether notifications go anywhere.
func (n *Notifier) Enabled() bool { return n != nil && n.addr != nil }

// Notify sends the lines as one datagram. Each line is KEY=VALUE; a value
// must not contain a newline (it would start a new assignment), so
// newlines are replaced by spaces.
func (n *Notifier) Notify(lines ...string) error {
	if !n.Enabled() || len(lines) == 0 {
		return nil
	}
	var b strings.Builder
	for _, l := range lines {
		b.WriteString(strings.ReplaceAll(l, "\n", " "))
		b.WriteByte('\n')
	}
	// A fresh unbound socket per message: notifications are rare (start,
	// reload, stop), and no descriptor is held open for the process's life.
	c, err := net.DialUnix("unixgram", nil, n.addr)
	if err != nil {
		return fmt.Errorf("notify %s: %w", n.addr.Name, err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(b.String())); err != nil {
		return fmt.Errorf("notify %s: %w", n.addr.Name, err)
	}
	return nil
}

// Status is the STATUS= line `systemctl status` shows.
func Status(text string) string { return "STATUS=" + text }

// Ready says that start-up or a reload finished and the service serves.
func (n *Notifier) Ready(status string) error { return n.Notify("READY=1", Status(status)) }

// Reloading says a configuration reload began; Ready ends it.
func (n *Notifier) Reloading(status string) error { return n.Notify("RELOADING=1", Status(status)) }

// Stopping says the service is shutting down (draining).
func (n *Notifier) Stopping(status string) error { return n.Notify("STOPPING=1", Status(status)) }

// SetStatus updates the status line alone.
func (n *Notifier) SetStatus(status string) error { return n.Notify(Status(status)) }
