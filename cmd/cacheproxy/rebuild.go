package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/config"
)

// Per-path outcomes of a rebuild, as printed (STATUS<TAB>PATH).
const (
	rebuildAttested     = "attested"
	rebuildNotHere      = "not instantiable here"
	rebuildBuildFailed  = "build failed"
	rebuildAttestFailed = "attestation refused"
	// rebuildDiffers and rebuildNotReproducible: see rebuildcheck.go.
)

// rebuildReason is the audit trail's reason for the imports this command makes.
const rebuildReason = "cacheproxy rebuild"

const rebuildSynopsis = "rebuild [--once] --key-file REBUILDER.sec [--server URL --token-file FILE | -c FILE]\n" +
	"        [--interval D] [--jobs N] [--check] [--keep-diffs DIR] [--instantiate FILE [-A ATTR]...]"

// attrList is a repeatable -A.
type attrList []string

func (a *attrList) String() string     { return strings.Join(*a, " ") }
func (a *attrList) Set(v string) error { *a = append(*a, v); return nil }

// durationFlag reads a flag as config durations are written ("90s", "5m", "1d").
type durationFlag struct{ d *config.Duration }

func (f durationFlag) String() string {
	if f.d == nil {
		return ""
	}
	return f.d.String()
}
func (f durationFlag) Set(v string) error { return f.d.UnmarshalText([]byte(v)) }

// rebuildFlags are the command's own flags; each overrides its key of the
// [rebuild] section when given.
type rebuildFlags struct {
	once        bool
	keyFile     string
	interval    config.Duration
	jobs        int
	check       bool
	keepDiffs   string
	instantiate string
	attrs       attrList
}

func (f *rebuildFlags) register(fs *flag.FlagSet) {
	fs.BoolVar(&f.once, "once", false, "drain the queue once and exit (exit status 1 if any path was not attested);\n"+
		"without it, pass over the queue every --interval until SIGINT or SIGTERM")
	fs.StringVar(&f.keyFile, "key-file", "", "the rebuilder's Nix signing key `FILE` (nix-store --generate-binary-cache-key; rebuild.key_file)")
	fs.Var(durationFlag{&f.interval}, "interval", "pause `D` between passes over the queue (rebuild.interval; default 5m)")
	fs.IntVar(&f.jobs, "jobs", 0, "build `N` derivations at once, dependencies first (rebuild.jobs; default 1)")
	fs.BoolVar(&f.check, "check", false, "build every derivation twice and attest only outputs both builds agree on (rebuild.check)")
	fs.StringVar(&f.keepDiffs, "keep-diffs", "", "keep both NARs of an output two builds disagree on under `DIR`/<hash>-<name>/ (rebuild.keep_diffs)")
	fs.StringVar(&f.instantiate, "instantiate", "", "run nix-instantiate `FILE` [-A ATTR]... before each pass, so that their .drv are in the local store")
	fs.Var(&f.attrs, "A", "an `ATTR` of the --instantiate file (repeatable)")
	// Their defaults are the [rebuild] section's, which the usage names.
	fs.Lookup("interval").DefValue = ""
	fs.Lookup("jobs").DefValue = ""
}

// apply writes the flags that were given over cfg's [rebuild] section,
// recording each so that a bad value is reported as the flag's.
func (f *rebuildFlags) apply(fs *flag.FlagSet, file *config.File) {
	r := &file.Config.Rebuild
	fs.Visit(func(fl *flag.Flag) {
		switch fl.Name {
		case "key-file":
			r.KeyFile = f.keyFile
		case "interval":
			r.Interval = f.interval
		case "jobs":
			r.Jobs = f.jobs
		case "check":
			r.Check = f.check
		case "keep-diffs":
			r.KeepDiffs = f.keepDiffs
		default:
			return
		}
		file.Override("rebuild."+strings.ReplaceAll(fl.Name, "-", "_"), "--"+fl.Name)
	})
}

// cmdRebuild takes the gatekeeper's rebuild queue, builds each deriver that
// is valid in the local store, signs what it built with the rebuilder key
// and posts the attestations: once (--once), or every --interval until a
// signal. Which substituters the build may use is the local nix.conf's
// business: the operator makes the gatekeeper the only one, so every
// input is itself verified or rebuilt here first.
func cmdRebuild(args []string, cio cmdIO) error {
	fs := newFlags("rebuild", rebuildSynopsis, cio)
	af := adminFlags{configFlags: configFlags{env: cio.env}}
	af.register(fs)
	var rf rebuildFlags
	rf.register(fs)
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usageErr("unexpected argument %q", pos[0])
	}
	if len(rf.attrs) > 0 && rf.instantiate == "" {
		return usageErr("-A names an attribute of the --instantiate FILE: pass --instantiate")
	}
	file, err := af.readAll()
	if err != nil {
		return err
	}
	rf.apply(fs, file)
	if ps := rebuildProblems(file); len(ps) > 0 {
		return fmt.Errorf("%s is invalid:\n%w", file.Location, ps)
	}
	cfg := file.Config.Rebuild
	if cfg.KeyFile == "" {
		return usageErr("--key-file is required (or key_file in [rebuild])")
	}
	// [rebuild] finds the gatekeeper unless the flags do; else admin.listen
	// and admin.token_file, as for every admin command.
	if af.server == "" {
		af.server = cfg.Server
	}
	if af.tokenFile == "" {
		af.tokenFile = cfg.TokenFile
	}
	if af.caFile == "" {
		af.caFile = cfg.CAFile
	}
	keyName, err := secretKeyName(cfg.KeyFile)
	if err != nil {
		return err
	}
	if cfg.KeepDiffs != "" {
		if err := os.MkdirAll(cfg.KeepDiffs, 0o755); err != nil {
			return fmt.Errorf("--keep-diffs: %w", err)
		}
	}
	c, err := af.client()
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	r := &rebuilder{client: c, keyFile: cfg.KeyFile, keyName: keyName, nix: execNix{},
		jobs: cfg.Jobs, check: cfg.Check, keepDiffs: cfg.KeepDiffs, instantiate: rf.instantiate, attrs: rf.attrs,
		out: &lockedWriter{w: cio.stdout}, log: &lockedWriter{w: cio.stderr}, now: time.Now}
	if rf.once {
		return r.once(ctx)
	}
	return r.loop(ctx, cfg.Interval.Duration, func(d time.Duration) <-chan time.Time { return time.After(d) })
}

// rebuildProblems are the problems of the configuration that concern the
// rebuilder: reading it (TOML errors, unknown keys), and the [rebuild]
// section's values. The gatekeeper's own settings are not its business.
func rebuildProblems(f *config.File) config.Problems {
	ps := append(config.Problems(nil), f.Problems()...)
	seen := map[string]bool{}
	for _, p := range ps {
		seen[p.String()] = true
	}
	for _, p := range f.Check() {
		if strings.HasPrefix(p.Key, "rebuild.") && !seen[p.String()] {
			ps = append(ps, p)
		}
	}
	return ps
}

// secretKeyName reads the key name ("name:base64") from a Nix secret key
// file, to ask the queue for what this key has not attested yet.
func secretKeyName(file string) (string, error) {
	raw, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("--key-file: %w", err)
	}
	name, secret, ok := strings.Cut(strings.TrimSpace(string(raw)), ":")
	if !ok || name == "" || secret == "" {
		return "", fmt.Errorf("--key-file %s: not a Nix secret key (want NAME:BASE64)", file)
	}
	return name, nil
}

// lockedWriter serialises writes: builds run concurrently (--jobs), and
// each line must come out whole.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

type rebuilder struct {
	client      *adminapi.Client
	keyFile     string
	keyName     string
	nix         nixTools
	jobs        int    // derivations built at once; < 2 is one
	check       bool   // build everything twice
	keepDiffs   string // keep both NARs of outputs two builds disagree on
	instantiate string // nix-instantiate this file first
	attrs       []string
	out         io.Writer // one STATUS<TAB>PATH line per queued path
	log         io.Writer // why a path was not attested

	now       func() time.Time
	retries   map[string]retryState // failed derivations: when to try again (long-running mode)
	removeAll func(string) error    // os.RemoveAll; tests make it fail
}

// passResult counts one pass's queued paths.
type passResult struct {
	queued, attested int
	waiting          int  // paths not built: their derivation failed recently (retryAfter)
	instantiateErr   bool // --instantiate failed
}

// failed counts what this pass tried and did not attest, a failed
// --instantiate as one.
func (p passResult) failed() int {
	n := p.queued - p.attested - p.waiting
	if p.instantiateErr {
		n++
	}
	return n
}

// Backoff for a derivation that did not build or whose attestation was
// refused: the long-running mode does not build it again at every pass
// (a failing LLVM build every five minutes), but after an hour, then
// after twice as long each time, up to a day.
const (
	retryFirst = time.Hour
	retryMax   = 24 * time.Hour
)

// retryState is when a failed derivation may be built again.
type retryState struct {
	after   time.Time
	backoff time.Duration
}

// once drains the queue as it is now: one pass, one line per queued path.
func (r *rebuilder) once(ctx context.Context) error {
	res, err := r.pass(ctx)
	if err != nil {
		return err
	}
	if ctx.Err() != nil {
		return fmt.Errorf("interrupted: %d of %d queued paths attested", res.attested, res.queued)
	}
	if res.instantiateErr {
		return fmt.Errorf("--instantiate failed (above); %d of %d queued paths were not attested", res.queued-res.attested, res.queued)
	}
	if res.failed() > 0 {
		return fmt.Errorf("%d of %d queued paths were not attested", res.failed(), res.queued)
	}
	return nil
}

// loop passes over the queue, then waits interval, until ctx ends (a
// signal), which is a clean stop: the builds in flight are interrupted and
// loop returns nil. A pass that fails (the gatekeeper is down) is
// reported and tried again after the interval.
func (r *rebuilder) loop(ctx context.Context, interval time.Duration, after func(time.Duration) <-chan time.Time) error {
	r.retries = map[string]retryState{}
	if r.now == nil {
		r.now = time.Now
	}
	for {
		res, err := r.pass(ctx)
		if ctx.Err() != nil {
			fmt.Fprintln(r.log, "stopping: signal received")
			return nil
		}
		if err != nil {
			fmt.Fprintf(r.log, "pass failed: %v; next pass in %s\n", err, config.FormatDuration(interval))
		} else if res.queued > 0 {
			wait := ""
			if res.waiting > 0 {
				wait = fmt.Sprintf(", %d waiting to retry a failed build", res.waiting)
			}
			fmt.Fprintf(r.log, "pass done: %d queued, %d attested, %d not%s; next pass in %s\n",
				res.queued, res.attested, res.queued-res.attested-res.waiting, wait, config.FormatDuration(interval))
		}
		select {
		case <-ctx.Done():
			fmt.Fprintln(r.log, "stopping: signal received")
			return nil
		case <-after(interval):
		}
	}
}

// pass instantiates (--instantiate), reads the queue and builds what it
// names, --jobs at a time, printing one line per queued path as its
// derivation is done. A failed nix-instantiate is reported and the pass
// goes on with what is valid here; it counts as one failure.
func (r *rebuilder) pass(ctx context.Context) (passResult, error) {
	var res passResult
	if r.instantiate != "" {
		args := []string{r.instantiate}
		for _, a := range r.attrs {
			args = append(args, "-A", a)
		}
		if _, err := r.nix.run(ctx, "nix-instantiate", args...); err != nil {
			fmt.Fprintf(r.log, "--instantiate %s: %v\n", r.instantiate, err)
			res.instantiateErr = true
		}
	}
	q, err := r.client.GetRebuildQueue(ctx, r.keyName)
	if err != nil {
		return res, fmt.Errorf("read the rebuild queue: %w", err)
	}
	res.queued += len(q.Paths)
	// Several queued paths may be outputs of one derivation: build it once.
	var jobs []*buildJob
	byDrv := map[string]*buildJob{}
	for _, e := range q.Paths {
		if e.Deriver == "" {
			r.report(rebuildNotHere, e.StorePath, "", "the gatekeeper knows no deriver for it")
			continue
		}
		j := byDrv[e.Deriver]
		if j == nil {
			j = &buildJob{drv: e.Deriver}
			byDrv[e.Deriver] = j
			jobs = append(jobs, j)
		}
		j.paths = append(j.paths, e.StorePath)
	}
	jobs = r.dueJobs(jobs, &res)
	if r.jobs > 1 {
		r.dependencies(ctx, jobs)
	}
	runJobs(ctx, jobs, r.jobs, func(ctx context.Context, j *buildJob) { j.outcome = r.rebuild(ctx, j.drv) },
		func(j *buildJob) {
			if ctx.Err() != nil {
				return // interrupted: the next run takes it again
			}
			retry := false
			for _, p := range j.paths {
				status, diffs := j.outcome.of(p)
				if status == "" {
					status = rebuildBuildFailed
					fmt.Fprintf(r.log, "%s did not build %s\n", j.drv, p)
				}
				if r.report(status, p, diffs, "") {
					res.attested++
				}
				retry = retry || status == rebuildBuildFailed || status == rebuildAttestFailed
			}
			r.noteFailure(j.drv, retry)
		})
	return res, nil
}

// dueJobs leaves out the derivations that failed recently and are not
// due for another try, counting their paths as waiting.
func (r *rebuilder) dueJobs(jobs []*buildJob, res *passResult) []*buildJob {
	var due []*buildJob
	for _, j := range jobs {
		if st, ok := r.retries[j.drv]; ok && r.now().Before(st.after) {
			res.waiting += len(j.paths)
			continue
		}
		due = append(due, j)
	}
	if res.waiting > 0 {
		fmt.Fprintf(r.log, "%d queued paths wait for another try of a derivation that failed recently\n", res.waiting)
	}
	return due
}

// noteFailure starts or lengthens a derivation's backoff when it failed,
// and forgets it when it did not.
func (r *rebuilder) noteFailure(drv string, failed bool) {
	if r.retries == nil {
		return // --once: there is no next try
	}
	if !failed {
		delete(r.retries, drv)
		return
	}
	st := r.retries[drv]
	st.backoff = min(max(2*st.backoff, retryFirst), retryMax)
	st.after = r.now().Add(st.backoff)
	r.retries[drv] = st
	fmt.Fprintf(r.log, "%s: next try not before %s\n", drv, st.after.UTC().Format(time.RFC3339))
}

// dependencies finds, for each job, the other jobs its derivation needs
// built first: queued derivers in the closure of its .drv (its inputs,
// transitively). A .drv not valid here has none (its job fails at once).
func (r *rebuilder) dependencies(ctx context.Context, jobs []*buildJob) {
	queued := map[string]bool{}
	for _, j := range jobs {
		queued[j.drv] = true
	}
	for _, j := range jobs {
		out, err := r.nix.run(ctx, "nix-store", "--query", "--requisites", j.drv)
		if err != nil {
			continue
		}
		for _, p := range strings.Fields(out) {
			if p != j.drv && queued[p] {
				j.deps = append(j.deps, p)
			}
		}
	}
}

// report prints one STATUS<TAB>PATH line (with a third field naming the
// kept NARs, if any) and says whether the path was attested.
func (r *rebuilder) report(status, path, diffs, why string) bool {
	if diffs != "" {
		fmt.Fprintf(r.out, "%s\t%s\tdiffs: %s\n", status, path, diffs)
	} else {
		fmt.Fprintf(r.out, "%s\t%s\n", status, path)
	}
	if why != "" {
		fmt.Fprintf(r.log, "%s: %s\n", path, why)
	}
	return status == rebuildAttested
}

// outcome is what one derivation's rebuild came to.
type outcome struct {
	whole  string            // the status of every output, when the derivation failed as a whole
	status map[string]string // output -> status
	diffs  map[string]string // output -> the directory keeping its two NARs (--keep-diffs)
}

// of is the status of one output ("" when the build did not make it) and
// where its NARs were kept.
func (o outcome) of(path string) (string, string) {
	if s, ok := o.status[path]; ok {
		return s, o.diffs[path]
	}
	return o.whole, o.diffs[path]
}

// rebuild builds one derivation, signs its outputs and posts the
// attestations.
func (r *rebuilder) rebuild(ctx context.Context, drv string) outcome {
	whole := func(status string, err error) outcome {
		fmt.Fprintf(r.log, "%s: %v\n", drv, err)
		return outcome{whole: status}
	}
	if _, err := r.nix.run(ctx, "nix-store", "--check-validity", drv); err != nil {
		return whole(rebuildNotHere, err)
	}
	// Outputs already valid here may come from anywhere (a substituter, an
	// older build): build again and compare (--check) rather than sign
	// them as they are.
	realise := []string{"--realise", drv}
	valid := r.validOutputs(ctx, drv)
	checked := valid != nil
	if checked {
		realise = []string{"--realise", "--check", "--keep-failed", drv}
	}
	out, err := r.nix.run(ctx, "nix-store", realise...)
	if checked {
		r.cleanup(drv, err, nil) // the .check copies: after keepPair
	}
	if err != nil {
		if checked && strings.Contains(err.Error(), nixNondeterministic) {
			o := whole(rebuildNotReproducible, fmt.Errorf("the output already in the local store is not what a build here makes: %w", err))
			o.diffs = map[string]string{}
			for _, v := range valid {
				if _, dir, kerr := r.keepPair(ctx, v, "1-in-store.nar"); kerr == nil && dir != "" {
					o.diffs[v] = dir
				} else if kerr != nil && !errors.Is(kerr, os.ErrNotExist) {
					fmt.Fprintf(r.log, "%s: %v\n", v, kerr)
				}
			}
			r.cleanup(drv, nil, valid)
			return o
		}
		r.cleanup(drv, nil, valid)
		return whole(rebuildBuildFailed, err)
	}
	outputs := strings.Fields(out)
	if len(outputs) == 0 {
		return whole(rebuildBuildFailed, errors.New("nix-store --realise named no outputs"))
	}
	if _, err := r.nix.run(ctx, "nix", append([]string{"store", "sign", "--key-file", r.keyFile}, outputs...)...); err != nil {
		return whole(rebuildAttestFailed, err)
	}
	infos, err := r.nix.run(ctx, "nix", append([]string{"path-info", "--json", "--sigs"}, outputs...)...)
	if err != nil {
		return whole(rebuildAttestFailed, err)
	}
	var parsed []pathInfo
	if err := json.Unmarshal([]byte(infos), &parsed); err != nil {
		return whole(rebuildAttestFailed, fmt.Errorf("nix path-info --json: %w", err))
	}
	// A rebuild that is not what the upstream serves is built once more,
	// and the report says which kind of difference it is.
	cl, err := r.classify(ctx, drv, parsed, checked)
	if err != nil {
		return whole(rebuildBuildFailed, err)
	}
	o := outcome{status: map[string]string{}, diffs: cl.diffs}
	// With --check, an output two builds here disagree on is not signed
	// over to the gatekeeper unless there is a mismatch to label.
	var post []string
	for _, p := range outputs {
		o.status[p] = rebuildAttestFailed // until the gatekeeper says it stored our signature
		if cl.unstable[p] && cl.reports[p] == nil && r.check {
			o.status[p] = rebuildNotReproducible
			fmt.Fprintf(r.log, "%s: two builds here differ (--check); not attested\n", p)
			continue
		}
		post = append(post, p)
	}
	if len(post) == 0 {
		return o
	}
	if infos, err = withReports(infos, cl.reports, post); err != nil {
		return whole(rebuildAttestFailed, err)
	}
	_, err = r.client.ImportAttestations(ctx, strings.NewReader(infos), rebuildReason, func(res adminapi.AttestResult) {
		if _, ours := o.status[res.Path]; !ours {
			return
		}
		if res.Status == adminapi.AttestStored || res.Status == adminapi.AttestKnown {
			o.status[res.Path] = rebuildAttested
			if rep := cl.reports[res.Path]; rep != nil {
				o.status[res.Path] = rebuildDiffers
				if rep.Classification == classNotReproducible {
					o.status[res.Path] = rebuildNotReproducible
				}
				fmt.Fprintf(r.log, "%s: built %s, the upstream serves %s (%s)\n", res.Path, rep.Builds[0].NarHash, rep.UpstreamNarHash, rep.Classification)
			}
		} else {
			fmt.Fprintf(r.log, "%s: the gatekeeper answered %s (keys: %s)\n", res.Path, res.Status, res.Key)
		}
	})
	if err != nil {
		return whole(rebuildAttestFailed, fmt.Errorf("post the attestations: %w", err))
	}
	for p, dir := range o.diffs {
		fmt.Fprintf(r.log, "%s: both NARs kept for diffoscope in %s\n", p, dir)
	}
	return o
}

// validOutputs returns drv's outputs when every one is valid in the local
// store already (so that --realise alone would build nothing), else nil.
func (r *rebuilder) validOutputs(ctx context.Context, drv string) []string {
	outs, err := r.nix.run(ctx, "nix-store", "--query", "--outputs", drv)
	if err != nil || len(strings.Fields(outs)) == 0 {
		return nil
	}
	if _, err = r.nix.run(ctx, "nix-store", append([]string{"--check-validity"}, strings.Fields(outs)...)...); err != nil {
		return nil
	}
	return strings.Fields(outs)
}
