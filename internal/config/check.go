package config

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
	"github.com/pelletier/go-toml/v2/unstable"
)

// Problem is one thing wrong with a configuration, printed as
// FILE:LINE: KEY: what.
type Problem struct {
	File string // the file, "embedded defaults", or the flag that set the value ("--listen")
	Line int    // 1-based; 0 when the key is not written in the file
	Key  string // with list indices, "upstreams[0].timeout"; "" when unknown
	Msg  string
}

func (p Problem) String() string {
	var b strings.Builder
	b.WriteString(p.File)
	if p.Line > 0 {
		fmt.Fprintf(&b, ":%d", p.Line)
	}
	if p.Key != "" {
		b.WriteString(": " + p.Key)
	}
	b.WriteString(": " + p.Msg)
	return b.String()
}

// Problems is every problem found in one configuration, in file order.
type Problems []Problem

func (ps Problems) Error() string {
	lines := make([]string, len(ps))
	for i, p := range ps {
		lines[i] = p.String()
	}
	return strings.Join(lines, "\n")
}

// maxSyntaxProblems bounds how many TOML errors one read reports: past a
// few, later ones are mostly echoes of the first.
const maxSyntaxProblems = 20

// File is a configuration as read from its Location, with what reading it
// found wrong and where each key is written, so that every later problem
// (Check) names its line.
type File struct {
	Location
	Config Config // over the defaults; best effort when Problems is not empty

	problems Problems          // TOML syntax errors, values of the wrong type, unknown keys
	skipped  bool              // lines with TOML errors were skipped to read the rest
	broken   bool              // the file could not be read as TOML at all: Config is the defaults
	lines    map[string]int    // key (with indices) -> line
	flags    map[string]string // key -> the flag that overrode it
}

// Read reads the configuration at loc over the embedded defaults. It fails
// only when the file cannot be read; everything wrong inside it is
// collected (Problems, Check) so that one run reports all of it: TOML
// errors (each offending line is skipped and the rest read on), values of
// the wrong type, and unknown keys, each with its line.
func Read(loc Location, env Env) (*File, error) {
	f := &File{Location: loc, Config: Defaults(env), lines: map[string]int{}, flags: map[string]string{}}
	if loc.Path == "" {
		return f, nil
	}
	data, err := os.ReadFile(loc.Path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", loc, err)
	}
	f.read(data, env)
	return f, nil
}

// Problems are the problems found while reading (not Validate's).
func (f *File) Problems() Problems { return f.problems }

// Override records that a flag set key after reading, so that a problem
// with the value names the flag instead of a line of the file.
func (f *File) Override(key, flag string) { f.flags[key] = flag }

// Check returns every problem of the configuration, those found while
// reading and Validate's, each located at the line that writes its key.
// After TOML errors, validation problems of keys the file does not write
// are left out: they may only echo a skipped line.
func (f *File) Check() Problems {
	ps := append(Problems(nil), f.problems...)
	if f.broken {
		return ps
	}
	for _, err := range unjoin(f.Config.Validate()) {
		var fe *FieldError
		if !errors.As(err, &fe) {
			ps = append(ps, Problem{File: f.Name(), Msg: err.Error()})
			continue
		}
		if p, ok := f.locate(fe.Key, fe.Err.Error()); ok {
			ps = append(ps, p)
		}
	}
	// In file order, as an editor walks them; flags and keys the file
	// does not write last.
	sort.SliceStable(ps, func(i, j int) bool {
		li, lj := ps[i].Line, ps[j].Line
		return li != 0 && (lj == 0 || li < lj)
	})
	return ps
}

func unjoin(err error) []error {
	if err == nil {
		return nil
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// locate places a problem with key: at the flag that set it, else at the
// line that writes it or its nearest enclosing table or list.
func (f *File) locate(key, msg string) (Problem, bool) {
	if flag, ok := f.flags[key]; ok {
		return Problem{File: flag, Key: key, Msg: msg}, true
	}
	line := f.Line(key)
	if line == 0 && f.skipped {
		return Problem{}, false
	}
	return Problem{File: f.Name(), Line: line, Key: key, Msg: msg}, true
}

// Line is the line that writes key or, when the file does not, its nearest
// enclosing table or list ("upstreams[0].timeout" falls back to the line of
// that [[upstreams]]); 0 when none is written.
func (f *File) Line(key string) int {
	for k := key; k != ""; k = parentKey(k) {
		if l, ok := f.lines[k]; ok {
			return l
		}
	}
	return 0
}

// parentKey drops the last part of a key: "a.b[2]" -> "a.b" -> "a" -> "".
func parentKey(k string) string {
	if strings.HasSuffix(k, "]") {
		if i := strings.LastIndexByte(k, '['); i >= 0 {
			return k[:i]
		}
	}
	if i := strings.LastIndexByte(k, '.'); i >= 0 {
		return k[:i]
	}
	return ""
}

var indexRE = regexp.MustCompile(`\[\d+\]`)

// unindexed drops list indices: "upstreams[1].url" -> "upstreams.url", the
// spelling of the TOML decoder's keys.
func unindexed(k string) string { return indexRE.ReplaceAllString(k, "") }

func (f *File) read(data []byte, env Env) {
	work := bytes.Clone(data)
	for {
		cfg, md, err := decode(work, env)
		if err == nil {
			f.Config = cfg
			f.lines = keyLines(work)
			f.unknownKeys(md.Undecoded())
			return
		}
		line, key, msg := tomlError(err)
		if key != "" && line > 0 {
			key = f.indexedKey(work, key, line)
		}
		f.problems = append(f.problems, Problem{File: f.Name(), Line: line, Key: key, Msg: msg})
		// Skip the offending line and read on, to report the other
		// problems in the same run; give up when that cannot help.
		if line == 0 || len(f.problems) >= maxSyntaxProblems || !blankLine(work, line) {
			f.broken = true
			f.Config = Defaults(env)
			f.lines = keyLines(work)
			return
		}
		f.skipped = true
	}
}

// indexedKey turns a decoder's key ("upstreams.timeout") into the indexed
// key written at line ("upstreams[1].timeout") when the file up to there
// can be parsed.
func (f *File) indexedKey(data []byte, key string, line int) string {
	best := ""
	for k, l := range keyLines(data) {
		// "a", "a[0]" and "a[1]" of `a = [1, 2]` all match: the key
		// itself is the shortest.
		if l == line && unindexed(k) == key && (best == "" || len(k) < len(best)) {
			best = k
		}
	}
	if best == "" {
		return key
	}
	return best
}

// unknownKeys reports the keys the decoder did not use, at every line that
// writes one, leaving out keys inside an unknown table.
func (f *File) unknownKeys(undecoded []toml.Key) {
	unknown := map[string]bool{}
	for _, k := range undecoded {
		unknown[k.String()] = true
	}
	inUnknown := func(k string) bool {
		for p := parentKey(unindexed(k)); p != ""; p = parentKey(p) {
			if unknown[p] {
				return true
			}
		}
		return false
	}
	found := map[string]bool{}
	var ps Problems
	for k, line := range f.lines {
		u := unindexed(k)
		// Elements of an unknown list are not reported again, but each
		// entry of an unknown [[table]] is.
		_, listWritten := f.lines[parentKey(k)]
		if unknown[u] && !inUnknown(k) && (!strings.HasSuffix(k, "]") || !listWritten) {
			found[u] = true
			ps = append(ps, Problem{File: f.Name(), Line: line, Key: k, Msg: "unknown key"})
		}
	}
	for k := range unknown {
		if !found[k] && !inUnknown(k) {
			ps = append(ps, Problem{File: f.Name(), Key: k, Msg: "unknown key"})
		}
	}
	sort.Slice(ps, func(i, j int) bool {
		if ps[i].Line != ps[j].Line {
			return ps[i].Line < ps[j].Line
		}
		return ps[i].Key < ps[j].Key
	})
	f.problems = append(f.problems, ps...)
}

// decodeErrRE matches the decoder's errors that are not a ParseError
// (values of the wrong type).
var decodeErrRE = regexp.MustCompile(`^toml: line (\d+) \(last key "([^"]*)"\): (.*)$`)

// tomlError splits a decoder error into its line, key and message.
func tomlError(err error) (line int, key, msg string) {
	var pe toml.ParseError
	if errors.As(err, &pe) {
		return pe.Position.Line, pe.LastKey, pe.Message
	}
	if m := decodeErrRE.FindStringSubmatch(err.Error()); m != nil {
		line, _ = strconv.Atoi(m[1])
		return line, m[2], m[3]
	}
	return 0, "", err.Error()
}

// blankLine overwrites line (1-based) with spaces, keeping every offset and
// line number; false when there is no such line or it is already blank.
func blankLine(data []byte, line int) bool {
	start := 0
	for n := 1; n < line; n++ {
		i := bytes.IndexByte(data[start:], '\n')
		if i < 0 {
			return false
		}
		start += i + 1
	}
	end := len(data)
	if i := bytes.IndexByte(data[start:], '\n'); i >= 0 {
		end = start + i
	}
	changed := false
	for i := start; i < end; i++ {
		if data[i] != ' ' && data[i] != '\t' && data[i] != '\r' {
			data[i] = ' '
			changed = true
		}
	}
	return changed
}

// decode reads data over the defaults. The TOML decoder reuses existing
// slice elements, which would let the default upstream's key leak into the
// first upstream of the file; so it starts from an empty list and restores
// the default only if the file has none.
func decode(data []byte, env Env) (Config, toml.MetaData, error) {
	cfg := Defaults(env)
	defaultUpstreams := cfg.Upstreams
	cfg.Upstreams = nil
	md, err := toml.NewDecoder(bytes.NewReader(data)).Decode(&cfg)
	if err != nil {
		return Config{}, md, err
	}
	if !md.IsDefined("upstreams") {
		cfg.Upstreams = defaultUpstreams
		return cfg, md, nil
	}
	// Per-entry defaults: TOML metadata does not say which array element
	// defined a key, so look at the raw tables. Checking presence (rather
	// than Timeout == 0) keeps an explicit "0s" or 0 visible to Validate.
	var raw struct {
		Upstreams []map[string]any `toml:"upstreams"`
	}
	if _, err := toml.Decode(string(data), &raw); err != nil {
		return Config{}, md, err
	}
	def := defaultUpstreams[0]
	for i := range cfg.Upstreams {
		set := func(key string) bool {
			if i >= len(raw.Upstreams) {
				return false
			}
			_, ok := raw.Upstreams[i][key]
			return ok
		}
		if !set("timeout") {
			cfg.Upstreams[i].Timeout = def.Timeout
		}
		if !set("max_connections") {
			cfg.Upstreams[i].MaxConnections = def.MaxConnections
		}
	}
	return cfg, md, nil
}

// keyLines maps every key the document writes, spelled with list indices
// as Validate names them ("upstreams[1].public_keys[0]"), to its line; a
// table header maps its table, and each [[entry]] of an array of tables
// maps "key[i]". It reads as far as the document parses.
// The decoder (BurntSushi/toml) does not expose positions, hence a second
// parser that does.
func keyLines(data []byte) map[string]int {
	lines := map[string]int{}
	var p unstable.Parser
	p.Reset(data)
	line := func(n *unstable.Node) int {
		if n == nil || n.Raw.Length == 0 && n.Raw.Offset == 0 {
			return 0
		}
		return p.Shape(n.Raw).Start.Line
	}
	arrays := map[string]int{} // array-of-tables key -> entries so far
	// resolve joins key parts under prefix, stepping into the latest entry
	// of any array of tables on the way, as TOML does.
	resolve := func(prefix string, it unstable.Iterator) (string, *unstable.Node) {
		k := prefix
		var first *unstable.Node
		for it.Next() {
			n := it.Node()
			if first == nil {
				first = n
			}
			k = joinKey(k, string(n.Data))
			if c := arrays[k]; c > 0 && !it.IsLast() {
				k = fmt.Sprintf("%s[%d]", k, c-1)
			}
		}
		return k, first
	}
	var value func(key string, n *unstable.Node, at int)
	keyValue := func(prefix string, kv *unstable.Node) {
		k, first := resolve(prefix, kv.Key())
		l := line(first)
		lines[k] = l
		value(k, kv.Value(), l)
	}
	value = func(key string, n *unstable.Node, at int) {
		switch n.Kind {
		case unstable.Array:
			it := n.Children()
			for i := 0; it.Next(); i++ {
				ek := fmt.Sprintf("%s[%d]", key, i)
				el := line(it.Node())
				if el == 0 {
					el = at
				}
				lines[ek] = el
				value(ek, it.Node(), el)
			}
		case unstable.InlineTable:
			it := n.Children()
			for it.Next() {
				keyValue(key, it.Node())
			}
		}
	}
	table := ""
	for p.NextExpression() {
		e := p.Expression()
		switch e.Kind {
		case unstable.KeyValue:
			keyValue(table, e)
		case unstable.Table:
			k, first := resolve("", e.Key())
			table = k
			lines[k] = line(first)
		case unstable.ArrayTable:
			k, first := resolve("", e.Key())
			table = fmt.Sprintf("%s[%d]", k, arrays[k])
			arrays[k]++
			lines[table] = line(first) // each entry has its line; the list as a whole has none
		}
	}
	return lines
}

// joinKey appends a key part, quoted as the decoder quotes it when it is
// not a bare key.
func joinKey(prefix, part string) string {
	if part == "" || strings.IndexFunc(part, func(r rune) bool {
		return !(r >= 'A' && r <= 'Z' || r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '_' || r == '-')
	}) >= 0 {
		part = strconv.Quote(part)
	}
	if prefix == "" {
		return part
	}
	return prefix + "." + part
}
