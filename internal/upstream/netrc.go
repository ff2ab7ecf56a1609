package upstream

import (
	"errors"
	"fmt"
	"strings"
)

// netrcLookup finds the credentials for host in netrc text, as curl (and so
// Nix's netrc-file) does: the first "machine" entry whose name equals host,
// else the "default" entry. Tokens are whitespace-separated and may be
// double-quoted with backslash escapes; "#" starts a comment; "macdef" bodies
// (up to an empty line) are skipped; "account" is read and ignored.
//
// Errors never quote tokens: a malformed file could otherwise put a password
// into a log line.
func netrcLookup(text, host string) (login, password string, ok bool, err error) {
	toks, err := netrcTokens(text)
	if err != nil {
		return "", "", false, err
	}
	type entry struct{ login, password string }
	var (
		found, haveDefault bool
		match, def         entry
		cur                *entry // entry receiving login/password; nil before the first machine
		scratch            entry  // a non-matching machine's fields land here
	)
	for i := 0; i < len(toks); i++ {
		value := func() (string, error) {
			if i+1 >= len(toks) {
				return "", fmt.Errorf("line %d: %q needs a value", toks[i].line, toks[i].text)
			}
			i++
			return toks[i].text, nil
		}
		switch toks[i].text {
		case "machine":
			name, err := value()
			if err != nil {
				return "", "", false, err
			}
			scratch = entry{}
			cur = &scratch
			if !found && strings.EqualFold(name, host) {
				found = true
				cur = &match
			}
		case "default":
			if !haveDefault {
				haveDefault = true
				cur = &def
			} else {
				scratch = entry{}
				cur = &scratch
			}
		case "login", "password", "account":
			kw := toks[i].text
			v, err := value()
			if err != nil {
				return "", "", false, err
			}
			if cur == nil {
				return "", "", false, fmt.Errorf("line %d: %q before any machine or default", toks[i].line, kw)
			}
			switch kw {
			case "login":
				cur.login = v
			case "password":
				cur.password = v
			}
		case "macdef":
			if _, err := value(); err != nil {
				return "", "", false, err
			}
			// The body was dropped by netrcTokens.
		default:
			return "", "", false, fmt.Errorf("line %d: unexpected token", toks[i].line)
		}
	}
	switch {
	case found:
		return match.login, match.password, true, nil
	case haveDefault:
		return def.login, def.password, true, nil
	}
	return "", "", false, nil
}

type netrcToken struct {
	text string
	line int
}

func netrcTokens(text string) ([]netrcToken, error) {
	var toks []netrcToken
	line := 1
	i := 0
	skipMacro := false
	for i < len(text) {
		c := text[i]
		switch {
		case c == '\n':
			line++
			i++
			if skipMacro {
				skipMacro = false
				// A macro body runs from the line after "macdef name" to the
				// first empty line.
				if strings.HasPrefix(text[i:], "\n") {
					continue // empty body
				}
				end := strings.Index(text[i:], "\n\n")
				if end < 0 {
					return toks, nil
				}
				line += strings.Count(text[i:i+end+2], "\n")
				i += end + 2
			}
		case c == ' ' || c == '\t' || c == '\r' || c == '\f' || c == '\v':
			i++
		case c == '#':
			for i < len(text) && text[i] != '\n' {
				i++
			}
		case c == '"':
			var b strings.Builder
			i++
			closed := false
			for i < len(text) {
				c := text[i]
				if c == '\\' && i+1 < len(text) {
					b.WriteByte(text[i+1])
					i += 2
					continue
				}
				if c == '"' {
					closed = true
					i++
					break
				}
				if c == '\n' {
					line++
				}
				b.WriteByte(c)
				i++
			}
			if !closed {
				return nil, errors.New("unterminated quoted string")
			}
			toks = append(toks, netrcToken{b.String(), line})
		default:
			start := i
			for i < len(text) && !strings.ContainsRune(" \t\r\n\f\v", rune(text[i])) {
				i++
			}
			toks = append(toks, netrcToken{text[start:i], line})
			if n := len(toks); n >= 2 && toks[n-2].text == "macdef" {
				skipMacro = true
			}
		}
	}
	return toks, nil
}
