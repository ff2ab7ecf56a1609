package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/config"
)

// cmdAudit prints the audit trail: who changed what, why, when, and how it
// ended, oldest first.
func cmdAudit(args []string, cio cmdIO) error {
	var since string
	var asJSON bool
	c, pos, err := adminCommand("audit", "audit [--since DURATION] [--json]", args, cio, func(fs *flag.FlagSet) {
		fs.StringVar(&since, "since", "", "only changes made within `DURATION`, such as 24h or 7d (default: every record kept)")
		fs.BoolVar(&asJSON, "json", false, "print JSON")
	})
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usageErr("unexpected argument %q", pos[0])
	}
	route := adminapi.PathAudit
	if since != "" {
		d, err := config.ParseDuration(since)
		if err != nil || d <= 0 {
			return usageErr("--since %q: want a positive duration such as 24h or 7d", since)
		}
		route += "?" + url.Values{"since": {time.Now().Add(-d).UTC().Format(time.RFC3339)}}.Encode()
	}
	var resp adminapi.Audit
	if err := c.Do(context.Background(), http.MethodGet, route, nil, &resp); err != nil {
		return err
	}
	if asJSON {
		return printJSON(cio.stdout, resp)
	}
	return printAudit(cio.stdout, resp.Records)
}

// printAudit renders records one per line, in columns; free text is quoted
// so that no reason can forge a line or a column.
func printAudit(w io.Writer, recs []adminapi.AuditRecord) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TIME\tWHO\tACTION\tOUTCOME\tWHAT\tREASON\tDETAIL")
	for _, r := range recs {
		reason := "-"
		if r.Reason != "" {
			reason = fmt.Sprintf("%q", r.Reason)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Time.UTC().Format(time.RFC3339), oneLine(r.Who), r.Action, r.Outcome,
			auditWhat(r), reason, auditDetail(r))
	}
	return tw.Flush()
}

func auditWhat(r adminapi.AuditRecord) string {
	if len(r.What) == 0 {
		return "-"
	}
	s := oneLine(r.What[0])
	if more := len(r.What) - 1 + r.WhatMore; more > 0 {
		s += fmt.Sprintf(" (+%d more)", more)
	}
	return s
}

// auditDetail is the counts, the entries replaced or removed, and the
// error of a refused change.
func auditDetail(r adminapi.AuditRecord) string {
	var parts []string
	names := make([]string, 0, len(r.Counts))
	for k := range r.Counts {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		parts = append(parts, fmt.Sprintf("%s=%d", k, r.Counts[k]))
	}
	was := "removed"
	if r.Outcome == "replaced" || strings.HasSuffix(r.Action, "_add") {
		was = "replaced"
	}
	for _, e := range r.PreviousAllow {
		parts = append(parts, fmt.Sprintf("%s %s (reason %q, expires %s, NarHash %s)", was, oneLine(e.StorePath), e.Reason, expiry(e.Expires), e.NarHash))
	}
	for _, e := range r.PreviousDeny {
		parts = append(parts, fmt.Sprintf("%s %s (reason %q)", was, oneLine(e.Pattern), e.Reason))
	}
	if r.Error != "" {
		parts = append(parts, "error: "+oneLine(r.Error))
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, "; ")
}

// oneLine replaces control characters (tabs, newlines) so that a value
// stays in its column and on its line.
func oneLine(s string) string {
	return strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return '?'
		}
		return r
	}, s)
}
