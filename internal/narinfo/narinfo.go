package narinfo

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Field is an unknown narinfo line kept verbatim so it survives a round trip.
type Field struct{ Key, Value string }

// NarInfo is a parsed .narinfo file. Hashes are normalized so that two spellings of
// one narinfo compare equal field by field.
type NarInfo struct {
	StorePath   string      // absolute, e.g. /nix/store/<hash>-<name>
	URL         string      // as in the file, relative to the cache root or absolute
	Compression Compression // as in the file; "bzip2" when the key is absent (Nix's default)
	FileHash    SHA256      // zero when absent
	FileSize    uint64      // 0 when absent
	NarHash     SHA256
	NarSize     uint64   // never 0 (Nix treats 0 as missing)
	References  []string // basenames "<hash>-<name>", in file order; nil when none
	Deriver     string   // basename, "" when absent or "unknown-deriver"
	System      string   // "" when absent
	Sigs        []string // "keyname:base64", in file order; nil when none
	CA          string   // content address as in the file, "" when absent
	Extra       []Field  // unknown keys in file order; nil when none
}

// FieldError is a narinfo parse error tied to one key. Key is "" when the error is
// about the file's structure rather than a field.
type FieldError struct {
	Line int    // 1-based line number, 0 when the error is not about one line
	Key  string // the narinfo key, e.g. "NarHash"
	Err  error
}

func (e *FieldError) Error() string {
	var b strings.Builder
	b.WriteString("narinfo")
	if e.Line > 0 {
		fmt.Fprintf(&b, " line %d", e.Line)
	}
	if e.Key != "" {
		fmt.Fprintf(&b, ": %s", e.Key)
	}
	fmt.Fprintf(&b, ": %v", e.Err)
	return b.String()
}

func (e *FieldError) Unwrap() error { return e.Err }

// singleKeys are the keys Nix interprets that may appear at most once. Nix lets a
// later StorePath or NarHash silently override an earlier one; a proxy that re-renders
// narinfos must not pick a different one than some other reader would, so duplicates
// are an error here.
func singleKey(k string) bool {
	switch k {
	case "StorePath", "URL", "Compression", "FileHash", "FileSize", "NarHash", "NarSize",
		"References", "Deriver", "System", "CA":
		return true
	}
	return false
}

// Parse parses narinfo text with Nix's semantics (libstore/nar-info.cc): "Key: value"
// lines; unknown keys kept in Extra (Nix ignores them, so they must never cause an
// error); StorePath, URL, NarHash and a non-zero NarSize required; hashes accepted as
// nix32, base16, base64 or SRI and normalized to "<algo>:<nix32>"; every store path
// checked to be valid and inside storeDir; references and deriver valid basenames.
//
// Deliberate differences from Nix, all in the strict direction except the first two:
// a missing final newline and empty lines are tolerated (hand-written and
// concatenated narinfos); a known key repeated, a known key not followed by ": ",
// a NarHash or FileHash that is not sha256 (Nix's own writer asserts sha256) and a
// CA that Nix could not parse are errors.
func Parse(data []byte, storeDir string) (*NarInfo, error) {
	if err := checkStoreDir(storeDir); err != nil {
		return nil, fmt.Errorf("narinfo: %w", err)
	}
	n := &NarInfo{}
	seen := map[string]bool{}
	// Each line becomes its own string: the fields are substrings of their
	// lines, so a multi-megabyte unknown line (which the gate drops) is not
	// kept alive by the short fields taken from its neighbours.
	text := data
	lineNo := 0
	for len(text) > 0 {
		var line string
		if i := bytes.IndexByte(text, '\n'); i >= 0 {
			line, text = string(text[:i]), text[i+1:]
		} else {
			line, text = string(text), nil
		}
		lineNo++
		if line == "" {
			continue
		}
		colon := strings.IndexByte(line, ':')
		if colon < 0 {
			return nil, &FieldError{Line: lineNo, Err: fmt.Errorf("line %q has no ':'", truncate(line))}
		}
		key, rest := line[:colon], line[colon+1:]
		if !singleKey(key) && key != "Sig" {
			// Unknown to Nix: keep verbatim. One separating space is part of the
			// syntax, anything after it is the value.
			n.Extra = append(n.Extra, Field{Key: key, Value: strings.TrimPrefix(rest, " ")})
			continue
		}
		fe := func(err error) error { return &FieldError{Line: lineNo, Key: key, Err: err} }
		var value string
		switch {
		case strings.HasPrefix(rest, " "):
			value = rest[1:]
		case rest == "":
			value = ""
		default:
			// Nix would silently drop the first character of the value here.
			return nil, fe(errors.New("expected ': ' after the key"))
		}
		if singleKey(key) {
			if seen[key] {
				return nil, fe(errors.New("key appears more than once"))
			}
			seen[key] = true
		}
		if err := n.setField(key, value, storeDir); err != nil {
			return nil, fe(err)
		}
	}
	if n.Compression == "" {
		n.Compression = CompressionBzip2
	}
	switch {
	case !seen["StorePath"]:
		return nil, &FieldError{Key: "StorePath", Err: errors.New("missing")}
	case n.URL == "":
		return nil, &FieldError{Key: "URL", Err: errors.New("missing or empty")}
	case !seen["NarHash"]:
		return nil, &FieldError{Key: "NarHash", Err: errors.New("missing")}
	case n.NarSize == 0:
		return nil, &FieldError{Key: "NarSize", Err: errors.New("missing or zero")}
	}
	return n, nil
}

func (n *NarInfo) setField(key, value, storeDir string) error {
	switch key {
	case "StorePath":
		if _, err := ParseStorePath(value, storeDir); err != nil {
			return err
		}
		n.StorePath = value
	case "URL":
		n.URL = value
	case "Compression":
		n.Compression = Compression(value)
	case "FileHash":
		h, err := parseDigest(value)
		if err != nil {
			return err
		}
		n.FileHash = h
	case "FileSize":
		v, err := parseSize(value)
		if err != nil {
			return err
		}
		n.FileSize = v
	case "NarHash":
		h, err := parseDigest(value)
		if err != nil {
			return err
		}
		n.NarHash = h
	case "NarSize":
		v, err := parseSize(value)
		if err != nil {
			return err
		}
		n.NarSize = v
	case "References":
		// Nix tokenizes on spaces, so runs of spaces and an empty value are fine.
		for _, r := range strings.Fields(value) {
			if _, _, err := ParseBaseName(r); err != nil {
				return err
			}
			n.References = append(n.References, r)
		}
	case "Deriver":
		if value != "unknown-deriver" {
			if _, _, err := ParseBaseName(value); err != nil {
				return err
			}
			n.Deriver = value
		}
	case "System":
		n.System = value
	case "Sig":
		// Nix stores an empty Sig as a signature that can never verify; dropping
		// it keeps Sigs meaningful without refusing such a narinfo.
		if value != "" {
			n.Sigs = append(n.Sigs, value)
		}
	case "CA":
		// An empty CA means "none" to Nix (parseOpt).
		if value != "" {
			if _, err := ParseCA(value); err != nil {
				return err
			}
		}
		n.CA = value
	}
	return nil
}

// parseSize accepts what Nix's string2Int<uint64_t> accepts: plain decimal digits.
func parseSize(value string) (uint64, error) {
	if value == "" || strings.TrimLeft(value, "0123456789") != "" {
		return 0, fmt.Errorf("invalid size %q: not a decimal number", truncate(value))
	}
	v, err := strconv.ParseUint(value, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("invalid size %q: %w", truncate(value), err)
	}
	return v, nil
}

func truncate(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// Marshal renders the narinfo in Nix's key order (StorePath, URL, Compression,
// FileHash, FileSize, NarHash, NarSize, References, Deriver, System, Sig..., CA)
// followed by Extra. For any n returned by Parse, Parse(n.Marshal()) equals n.
// Like Nix, it always writes a References line, even an empty one.
func (n *NarInfo) Marshal() []byte {
	var b bytes.Buffer
	line := func(k, v string) {
		b.WriteString(k)
		b.WriteString(": ")
		b.WriteString(v)
		b.WriteByte('\n')
	}
	line("StorePath", n.StorePath)
	line("URL", n.URL)
	if n.Compression != "" {
		line("Compression", string(n.Compression))
	}
	if !n.FileHash.IsZero() {
		line("FileHash", n.FileHash.String())
	}
	if !n.FileHash.IsZero() || n.FileSize != 0 {
		line("FileSize", strconv.FormatUint(n.FileSize, 10))
	}
	line("NarHash", n.NarHash.String())
	line("NarSize", strconv.FormatUint(n.NarSize, 10))
	line("References", strings.Join(n.References, " "))
	if n.Deriver != "" {
		line("Deriver", n.Deriver)
	}
	if n.System != "" {
		line("System", n.System)
	}
	for _, s := range n.Sigs {
		line("Sig", s)
	}
	if n.CA != "" {
		line("CA", n.CA)
	}
	for _, f := range n.Extra {
		line(f.Key, f.Value)
	}
	return b.Bytes()
}

// StorePathParsed returns the parsed form of n.StorePath.
func (n *NarInfo) StorePathParsed(storeDir string) (StorePath, error) {
	return ParseStorePath(n.StorePath, storeDir)
}

// parseDigest parses a FileHash or NarHash. All zero bytes is refused: it is
// no real digest, and the zero SHA256 means "absent" everywhere else (a
// FileHash of zeros would otherwise silently turn its check off).
func parseDigest(s string) (SHA256, error) {
	h, err := ParseSHA256(s)
	if err == nil && h.IsZero() {
		return h, errors.New("hash is all zero bytes")
	}
	return h, err
}
