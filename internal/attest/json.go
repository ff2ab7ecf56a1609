package attest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
)

// member is one key/value of a JSON object, kept in input order (encoding/json maps
// lose it, and claims must come back in input order).
type member struct {
	Key   string
	Value json.RawMessage
}

// decodeObject decodes a JSON object into its members in order, rejecting duplicate
// keys: two values for one path or one field would make the claim ambiguous.
func decodeObject(raw []byte) ([]member, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil {
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, fmt.Errorf("want a JSON object, got %s", describe(raw))
	}
	var out []member
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, fmt.Errorf("invalid JSON: %w", err)
		}
		key, ok := tok.(string)
		if !ok {
			return nil, errors.New("invalid JSON: object key is not a string")
		}
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, fmt.Errorf("invalid JSON at key %q: %w", key, err)
		}
		if seen[key] {
			return nil, fmt.Errorf("key %q appears more than once", key)
		}
		seen[key] = true
		out = append(out, member{key, v})
	}
	if _, err := dec.Token(); err != nil { // closing '}'
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	if err := expectEOF(dec); err != nil {
		return nil, err
	}
	return out, nil
}

func expectEOF(dec *json.Decoder) error {
	if _, err := dec.Token(); err != io.EOF {
		if err != nil {
			return fmt.Errorf("invalid JSON: %w", err)
		}
		return errors.New("invalid JSON: data after the top-level value")
	}
	return nil
}

// describe names the JSON type of raw for error messages.
func describe(raw []byte) string {
	t := bytes.TrimSpace(raw)
	if len(t) == 0 {
		return "nothing"
	}
	switch t[0] {
	case '{':
		return "an object"
	case '[':
		return "an array"
	case '"':
		return "a string"
	case 't', 'f':
		return "a boolean"
	case 'n':
		return "null"
	default:
		return "a number"
	}
}

// The helpers below decode the values every entry has (paths, hashes,
// signatures, sizes) without encoding/json when they are in the plain
// form Nix writes, and hand anything else to encoding/json: so they decide
// exactly as json.Unmarshal does, at a fraction of its cost per entry.

// plainString returns the contents of raw when it is a JSON string of
// printable ASCII with no escapes.
func plainString(raw []byte) (string, bool) {
	if len(raw) < 2 || raw[0] != '"' || raw[len(raw)-1] != '"' {
		return "", false
	}
	for _, c := range raw[1 : len(raw)-1] {
		if c < 0x20 || c > 0x7e || c == '"' || c == '\\' {
			return "", false
		}
	}
	return string(raw[1 : len(raw)-1]), true
}

// unmarshalString is json.Unmarshal(raw, s).
func unmarshalString(raw []byte, s *string) error {
	if v, ok := plainString(raw); ok {
		*s = v
		return nil
	}
	return json.Unmarshal(raw, s)
}

// plainStrings returns the elements of raw when it is a JSON array of
// plain strings (see plainString), empty or not, with JSON white space.
func plainStrings(raw []byte) ([]string, bool) {
	if len(raw) < 2 || raw[0] != '[' || raw[len(raw)-1] != ']' {
		return nil, false
	}
	out := []string{}
	i := skipSpace(raw, 1)
	if i == len(raw)-1 {
		return out, true
	}
	for {
		if i >= len(raw) || raw[i] != '"' {
			return nil, false
		}
		end := i + 1
		for end < len(raw) && raw[end] != '"' {
			end++
		}
		if end == len(raw) {
			return nil, false
		}
		v, ok := plainString(raw[i : end+1])
		if !ok {
			return nil, false
		}
		out = append(out, v)
		i = skipSpace(raw, end+1)
		switch {
		case i == len(raw)-1:
			return out, true
		case i < len(raw) && raw[i] == ',':
			i = skipSpace(raw, i+1)
		default:
			return nil, false
		}
	}
}

// unmarshalStrings is json.Unmarshal(raw, v) for a []string.
func unmarshalStrings(raw []byte, v *[]string) error {
	if out, ok := plainStrings(raw); ok {
		*v = out
		return nil
	}
	return json.Unmarshal(raw, v)
}

func isNull(raw json.RawMessage) bool { return string(bytes.TrimSpace(raw)) == "null" }

func checkStoreDirField(raw json.RawMessage, storeDir string) error {
	var sd string
	if err := unmarshalString(raw, &sd); err != nil {
		return fmt.Errorf("storeDir: want a string, got %s", describe(raw))
	}
	if sd != storeDir {
		return fmt.Errorf("storeDir: input is for store %q, this proxy serves %q", sd, storeDir)
	}
	return nil
}

// entryFields splits one entry, a JSON value the streaming decoder has
// already checked for syntax, into its members, refusing duplicate keys.
// It is on the path of every imported entry, so it walks the bytes itself
// rather than through json.Decoder's tokens (several times slower).
func entryFields(raw json.RawMessage) (map[string]json.RawMessage, error) {
	t := bytes.TrimSpace(raw)
	if len(t) == 0 || t[0] != '{' {
		return nil, fmt.Errorf("want a JSON object, got %s", describe(raw))
	}
	// The syntax was checked once, by the decoder; these checks only keep
	// the walk inside the bytes should that ever not hold.
	bad := errors.New("invalid JSON object")
	f := make(map[string]json.RawMessage, 8)
	i := skipSpace(t, 1)
	if i >= len(t) {
		return nil, bad
	}
	if t[i] == '}' {
		return f, nil
	}
	for {
		if i >= len(t) || t[i] != '"' {
			return nil, bad
		}
		end := stringEnd(t, i)
		if end > len(t) || end-i < 2 {
			return nil, bad
		}
		var key string
		if bytes.IndexByte(t[i:end], '\\') >= 0 {
			if err := json.Unmarshal(t[i:end], &key); err != nil {
				return nil, fmt.Errorf("invalid JSON: %w", err)
			}
		} else {
			key = string(t[i+1 : end-1])
		}
		i = skipSpace(t, end)
		if i >= len(t) || t[i] != ':' {
			return nil, bad
		}
		i = skipSpace(t, i+1)
		if i >= len(t) {
			return nil, bad
		}
		vend := valueEnd(t, i)
		if vend <= i || vend > len(t) {
			return nil, bad
		}
		if _, dup := f[key]; dup {
			return nil, fmt.Errorf("key %q appears more than once", key)
		}
		f[key] = t[i:vend:vend]
		i = skipSpace(t, vend)
		if i >= len(t) {
			return nil, bad
		}
		if t[i] == '}' {
			return f, nil
		}
		if t[i] != ',' {
			return nil, bad
		}
		i = skipSpace(t, i+1)
	}
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// stringEnd returns the index just past the JSON string starting at b[i].
func stringEnd(b []byte, i int) int {
	for j := i + 1; j < len(b); j++ {
		switch b[j] {
		case '\\':
			j++
		case '"':
			return j + 1
		}
	}
	return len(b)
}

// valueEnd returns the index just past the (valid) JSON value at b[i].
func valueEnd(b []byte, i int) int {
	switch b[i] {
	case '"':
		return stringEnd(b, i)
	case '{', '[':
		depth := 0
		for j := i; j < len(b); j++ {
			switch b[j] {
			case '"':
				j = stringEnd(b, j) - 1
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return j + 1
				}
			}
		}
		return len(b)
	default:
		j := i
		for j < len(b) && b[j] != ',' && b[j] != '}' && b[j] != ']' && b[j] != ' ' && b[j] != '\t' && b[j] != '\n' && b[j] != '\r' {
			j++
		}
		return j
	}
}

// resolvePath accepts an absolute store path (format 1) or a basename (format 2)
// and returns the absolute path.
func resolvePath(s, storeDir string) (string, error) {
	if strings.HasPrefix(s, "/") {
		if _, err := narinfo.ParseStorePath(s, storeDir); err != nil {
			return "", err
		}
		return s, nil
	}
	if _, _, err := narinfo.ParseBaseName(s); err != nil {
		return "", err
	}
	return storeDir + "/" + s, nil
}

func resolveBase(s, storeDir string) (string, error) {
	abs, err := resolvePath(s, storeDir)
	if err != nil {
		return "", err
	}
	return abs[len(storeDir)+1:], nil
}

// entryClaim turns one path-info object into a claim, or reports (valid
// false) a path the input marks invalid. Fields not listed here
// (registrationTime, ultimate, closureSize, url, ...) are ignored: they are
// not part of what an attester vouches for.
func entryClaim(abs string, f map[string]json.RawMessage, storeDir string) (c Claim, valid bool, err error) {
	if v, ok := f["valid"]; ok {
		valid := string(v) == "true"
		if string(v) != "true" && string(v) != "false" && json.Unmarshal(v, &valid) != nil {
			return c, false, fmt.Errorf("valid: want a boolean, got %s", describe(v))
		}
		if !valid {
			return c, false, nil
		}
	}
	if v, ok := f["storeDir"]; ok {
		if err := checkStoreDirField(v, storeDir); err != nil {
			return c, false, err
		}
	}
	c, err = claimFields(abs, f, storeDir)
	return c, err == nil, err
}

func claimFields(abs string, f map[string]json.RawMessage, storeDir string) (Claim, error) {
	c := Claim{StorePath: abs}

	raw, ok := f["narHash"]
	if !ok {
		return Claim{}, errors.New("narHash: missing")
	}
	algo, digest, err := parseHashJSON(raw)
	if err != nil {
		return Claim{}, fmt.Errorf("narHash: %w", err)
	}
	if algo != "sha256" {
		return Claim{}, fmt.Errorf("narHash: algorithm is %s, want sha256", algo)
	}
	copy(c.NarHash[:], digest)

	raw, ok = f["narSize"]
	if !ok {
		return Claim{}, errors.New("narSize: missing")
	}
	if c.NarSize, err = parseUint(raw); err != nil {
		return Claim{}, fmt.Errorf("narSize: %w", err)
	}
	if c.NarSize == 0 {
		return Claim{}, errors.New("narSize: is zero")
	}

	raw, ok = f["references"]
	if !ok {
		// Nix always prints it; without it the fingerprint would silently claim
		// "no references".
		return Claim{}, errors.New("references: missing")
	}
	var refs []string
	if isNull(raw) || unmarshalStrings(raw, &refs) != nil {
		return Claim{}, fmt.Errorf("references: want an array of strings, got %s", describe(raw))
	}
	for i, ref := range refs {
		b, err := resolveBase(ref, storeDir)
		if err != nil {
			return Claim{}, fmt.Errorf("references[%d]: %w", i, err)
		}
		refs[i] = b
	}
	c.References = sortRefs(refs)

	if raw, ok := f["deriver"]; ok && !isNull(raw) {
		var d string
		if err := unmarshalString(raw, &d); err != nil {
			return Claim{}, fmt.Errorf("deriver: want a string or null, got %s", describe(raw))
		}
		if c.Deriver, err = resolveBase(d, storeDir); err != nil {
			return Claim{}, fmt.Errorf("deriver: %w", err)
		}
	}

	if raw, ok := f["signatures"]; ok && !isNull(raw) {
		if c.Sigs, err = parseSigs(raw); err != nil {
			return Claim{}, fmt.Errorf("signatures: %w", err)
		}
	}

	if raw, ok := f["ca"]; ok && !isNull(raw) {
		ca, err := parseCAJSON(raw)
		if err != nil {
			return Claim{}, fmt.Errorf("ca: %w", err)
		}
		c.CA = ca.String()
	}
	if raw, ok := f["cacheproxy"]; ok && !isNull(raw) {
		if describe(raw) != "an object" {
			return Claim{}, fmt.Errorf("cacheproxy: want an object, got %s", describe(raw))
		}
		if c.Rebuild, err = parseRebuildJSON(raw); err != nil {
			return Claim{}, fmt.Errorf("cacheproxy.%w", err)
		}
	}
	return c, nil
}

// parseRebuildJSON reads the "cacheproxy" object a rebuilder adds to an
// entry (see Rebuild). Errors start with the field they are about.
func parseRebuildJSON(raw json.RawMessage) (*Rebuild, error) {
	ms, err := decodeObject(raw)
	if err != nil {
		return nil, fmt.Errorf("classification: %w", err)
	}
	rb := &Rebuild{}
	for _, m := range ms {
		switch m.Key {
		case "classification":
			if json.Unmarshal(m.Value, &rb.Classification) != nil {
				return nil, fmt.Errorf("classification: want a string, got %s", describe(m.Value))
			}
			if rb.Classification != ClassStable && rb.Classification != ClassNotReproducible {
				return nil, fmt.Errorf("classification: %q is neither %q nor %q", rb.Classification, ClassStable, ClassNotReproducible)
			}
		case "upstreamNarHash":
			if rb.UpstreamNarHash, err = parseSHA256JSON(m.Value); err != nil {
				return nil, fmt.Errorf("upstreamNarHash: %w", err)
			}
		case "builds":
			var items []json.RawMessage
			if isNull(m.Value) || json.Unmarshal(m.Value, &items) != nil {
				return nil, fmt.Errorf("builds: want an array, got %s", describe(m.Value))
			}
			for i, it := range items {
				if describe(it) != "an object" {
					return nil, fmt.Errorf("builds[%d]: want an object with narHash and narSize, got %s", i, describe(it))
				}
				b, err := parseBuildJSON(it)
				if err != nil {
					return nil, fmt.Errorf("builds[%d].%w", i, err)
				}
				rb.Builds = append(rb.Builds, b)
			}
		default:
			return nil, fmt.Errorf("%s: unknown field (want classification, upstreamNarHash, builds)", m.Key)
		}
	}
	return rb, nil
}

func parseBuildJSON(raw json.RawMessage) (Build, error) {
	var b Build
	ms, err := decodeObject(raw)
	if err != nil {
		return b, fmt.Errorf("narHash: %w", err)
	}
	var hasHash, hasSize bool
	for _, m := range ms {
		switch m.Key {
		case "narHash":
			if b.NarHash, err = parseSHA256JSON(m.Value); err != nil {
				return b, fmt.Errorf("narHash: %w", err)
			}
			hasHash = true
		case "narSize":
			if b.NarSize, err = parseUint(m.Value); err != nil {
				return b, fmt.Errorf("narSize: %w", err)
			}
			hasSize = true
		default:
			return b, fmt.Errorf("%s: unknown field (want narHash, narSize)", m.Key)
		}
	}
	switch {
	case !hasHash:
		return b, errors.New("narHash: missing")
	case !hasSize:
		return b, errors.New("narSize: missing")
	}
	return b, nil
}

// parseSHA256JSON accepts a sha256 hash in any form parseHashJSON does.
func parseSHA256JSON(raw json.RawMessage) (narinfo.SHA256, error) {
	var h narinfo.SHA256
	algo, digest, err := parseHashJSON(raw)
	if err != nil {
		return h, err
	}
	if algo != "sha256" {
		return h, fmt.Errorf("algorithm is %s, want sha256", algo)
	}
	copy(h[:], digest)
	return h, nil
}

// parseUint accepts a JSON number that is a non-negative integer.
func parseUint(raw json.RawMessage) (uint64, error) {
	if plainUint(raw) {
		v, err := strconv.ParseUint(string(raw), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("want a non-negative integer, got %s", raw)
		}
		return v, nil
	}
	var n json.Number
	// json.Number would also accept a quoted number; Nix never quotes sizes.
	if describe(raw) != "a number" || json.Unmarshal(raw, &n) != nil {
		return 0, fmt.Errorf("want a non-negative integer, got %s", describe(raw))
	}
	v, err := strconv.ParseUint(n.String(), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("want a non-negative integer, got %s", n)
	}
	return v, nil
}

// plainUint reports whether raw is a JSON number in the plain form of a
// non-negative integer: "0", or digits not starting with 0.
func plainUint(raw []byte) bool {
	if len(raw) == 0 || raw[0] == '0' && len(raw) > 1 {
		return false
	}
	for _, c := range raw {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// parseHashJSON accepts a hash as a string in any Nix form ("sha256-<base64>",
// "sha256:<nix32|base16|base64>") or as the structured object of Nix >= 2.33
// {"algorithm": "sha256", "format": "base16|nix32|base64|sri", "hash": "..."}.
func parseHashJSON(raw json.RawMessage) (string, []byte, error) {
	var s string
	if unmarshalString(raw, &s) == nil {
		return narinfo.ParseHash(s)
	}
	ms, err := decodeObject(raw)
	if err != nil {
		return "", nil, fmt.Errorf("want a hash string or object, got %s", describe(raw))
	}
	var algo, format, hash string
	for _, m := range ms {
		var dst *string
		switch m.Key {
		case "algorithm":
			dst = &algo
		case "format":
			dst = &format
		case "hash":
			dst = &hash
		default:
			return "", nil, fmt.Errorf("unknown hash object field %q", m.Key)
		}
		if err := json.Unmarshal(m.Value, dst); err != nil {
			return "", nil, fmt.Errorf("%s: want a string, got %s", m.Key, describe(m.Value))
		}
	}
	if algo == "" || hash == "" {
		return "", nil, errors.New(`hash object needs "algorithm" and "hash"`)
	}
	switch format {
	case "", "base16", "nix32", "base32", "base64", "sri":
	default:
		return "", nil, fmt.Errorf("unknown hash format %q", format)
	}
	d, err := narinfo.ParseTypedHash(hash, algo)
	if err != nil {
		return "", nil, err
	}
	return algo, d, nil
}

// parseSigs accepts signatures as "keyname:base64" strings or, as in newer Nix JSON,
// {"keyName": ..., "sig": ...} objects, and returns them as strings.
func parseSigs(raw json.RawMessage) ([]string, error) {
	var out []string
	if strs, ok := plainStrings(raw); ok {
		for i, s := range strs {
			if s == "" {
				return nil, fmt.Errorf("[%d]: empty signature", i)
			}
			out = append(out, s)
		}
		return out, nil
	}
	var items []json.RawMessage
	if err := json.Unmarshal(raw, &items); err != nil {
		return nil, fmt.Errorf("want an array, got %s", describe(raw))
	}
	for i, it := range items {
		var s string
		if json.Unmarshal(it, &s) == nil {
			if s == "" {
				return nil, fmt.Errorf("[%d]: empty signature", i)
			}
			out = append(out, s)
			continue
		}
		var o struct {
			KeyName *string `json:"keyName"`
			Sig     *string `json:"sig"`
		}
		if err := json.Unmarshal(it, &o); err != nil || o.KeyName == nil || o.Sig == nil {
			return nil, fmt.Errorf(`[%d]: want "keyname:base64" or {"keyName","sig"}, got %s`, i, describe(it))
		}
		out = append(out, *o.KeyName+":"+*o.Sig)
	}
	return out, nil
}

// parseCAJSON accepts the narinfo-style string ("fixed:r:sha256:...") or the
// structured {"method": "nar|flat|text|git", "hash": <hash>} of format 2.
func parseCAJSON(raw json.RawMessage) (narinfo.CA, error) {
	var s string
	if unmarshalString(raw, &s) == nil {
		return narinfo.ParseCA(s)
	}
	ms, err := decodeObject(raw)
	if err != nil {
		return narinfo.CA{}, fmt.Errorf("want a content-address string or object, got %s", describe(raw))
	}
	var method string
	var hashRaw json.RawMessage
	for _, m := range ms {
		switch m.Key {
		case "method":
			if err := json.Unmarshal(m.Value, &method); err != nil {
				return narinfo.CA{}, fmt.Errorf("method: want a string, got %s", describe(m.Value))
			}
		case "hash":
			hashRaw = m.Value
		default:
			return narinfo.CA{}, fmt.Errorf("unknown content-address field %q", m.Key)
		}
	}
	if hashRaw == nil {
		return narinfo.CA{}, errors.New("hash: missing")
	}
	algo, d, err := parseHashJSON(hashRaw)
	if err != nil {
		return narinfo.CA{}, fmt.Errorf("hash: %w", err)
	}
	switch method {
	case narinfo.CAText, narinfo.CAFlat, narinfo.CANar, narinfo.CAGit:
	default:
		return narinfo.CA{}, fmt.Errorf("method: unknown content-address method %q", method)
	}
	// Round-trip through the string form so the same rules (text needs sha256)
	// apply to both spellings.
	return narinfo.ParseCA(narinfo.CA{Method: method, Algo: algo, Digest: d}.String())
}
