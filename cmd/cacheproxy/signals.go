package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/cacheproxy/cacheproxy/internal/config"
	"github.com/cacheproxy/cacheproxy/internal/sdnotify"
	"github.com/cacheproxy/cacheproxy/internal/server"
)

// runServer serves until SIGTERM or SIGINT, then drains (see
// server.Serve); SIGHUP reloads the configuration with load. It tells
// systemd (Type=notify) when it serves, reloads and stops.
func runServer(srv *server.Server, main, admin net.Listener, load func() (config.Config, error), log *slog.Logger) error {
	notify, err := sdnotify.New(os.Getenv(sdnotify.EnvVar))
	if err != nil {
		log.Warn("not notifying systemd", "err", err)
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGTERM, os.Interrupt)
	defer signal.Stop(sigs)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, main, admin) }()
	// The listeners are bound and the state is open: connections made from
	// now on are served.
	status := "serving on " + main.Addr().String()
	sdWarn(log, notify.Ready(status))
	for {
		select {
		case err := <-done:
			sdWarn(log, notify.Stopping("stopped"))
			return err
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				sdWarn(log, notify.Reloading("reloading the configuration"))
				sdWarn(log, notify.Ready(reload(srv, load, log, status)))
				continue
			}
			log.Info("signal received: stopping", "signal", sig.String())
			sdWarn(log, notify.Stopping("draining responses in flight"))
			cancel()
			return <-done
		}
	}
}

// reload applies the configuration load reads now, or keeps the running
// one when it is not valid. It returns the status line for systemd.
func reload(srv *server.Server, load func() (config.Config, error), log *slog.Logger, serving string) string {
	log.Info("SIGHUP: reloading the configuration")
	next, err := load()
	if err == nil {
		var res server.ReloadResult
		res, err = srv.Reload(next)
		if err == nil {
			for _, key := range res.NeedRestart {
				log.Warn("reload: this key changed but takes effect only at the next start; its running value is kept", "key", key)
			}
			log.Info("configuration reloaded", "decision_settings_changed", res.DecisionsChanged,
				"need_restart", strings.Join(res.NeedRestart, ","))
			if len(res.NeedRestart) > 0 {
				return fmt.Sprintf("%s; reloaded, restart needed for %s", serving, strings.Join(res.NeedRestart, ", "))
			}
			return serving + "; configuration reloaded"
		}
	}
	// One line per problem, so that each is a log record of its own.
	for _, line := range strings.Split(err.Error(), "\n") {
		if line = strings.TrimSpace(line); line != "" {
			log.Error("reload refused, the running configuration keeps serving", "err", line)
		}
	}
	return serving + "; last reload refused (see the log)"
}

func sdWarn(log *slog.Logger, err error) {
	if err != nil {
		log.Warn("systemd notification failed", "err", err)
	}
}
