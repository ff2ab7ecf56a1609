package main

import (
	"fmt"
	"io"
	"log/slog"

	"github.com/cacheproxy/cacheproxy/internal/config"
)

// newLogger writes serve's log: text (key=value) or json (one object a
// line, for log shippers), from level up. Values are validated by
// config.Validate; the errors here guard direct callers.
func newLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	lvl, err := config.ParseLogLevel(level)
	if err != nil {
		return nil, fmt.Errorf("log level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: lvl}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("log format: %w", config.CheckLogFormat(format))
}
