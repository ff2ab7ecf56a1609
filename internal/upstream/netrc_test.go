package upstream

import (
	"strings"
	"testing"
)

func TestNetrcLookup(t *testing.T) {
	const text = `# credentials for private caches
machine cache.example.com
	login alice
	password "pa ss\"word"
	account ignored

macdef init
machine cache.example.com login macro password macro

machine CI.Example.com login ci password ci-pw # trailing comment
default login anon password anon-pw
`
	for _, tc := range []struct {
		host, login, password string
		ok                    bool
	}{
		{"cache.example.com", "alice", `pa ss"word`, true},
		{"ci.example.com", "ci", "ci-pw", true}, // host names are case-insensitive
		{"elsewhere.example", "anon", "anon-pw", true},
	} {
		l, p, ok, err := netrcLookup(text, tc.host)
		if err != nil || l != tc.login || p != tc.password || ok != tc.ok {
			t.Errorf("%s: %q %q %v %v", tc.host, l, p, ok, err)
		}
	}
	if _, _, ok, err := netrcLookup("machine a login b password c\n", "z"); ok || err != nil {
		t.Errorf("no match: ok=%v err=%v", ok, err)
	}
	if _, _, ok, err := netrcLookup("", "z"); ok || err != nil {
		t.Errorf("empty: ok=%v err=%v", ok, err)
	}
	// The first matching machine wins.
	if l, _, _, _ := netrcLookup("machine h login first\nmachine h login second\n", "h"); l != "first" {
		t.Errorf("first match: %q", l)
	}
}

func TestNetrcErrorsDoNotLeakSecrets(t *testing.T) {
	for _, text := range []string{
		"machine h login u password",             // missing value
		"login u password topsecret",             // before any machine
		"machine h login u password x topsecret", // stray token
		`machine h password "topsecret`,          // unterminated quote
	} {
		_, _, _, err := netrcLookup(text, "h")
		if err == nil {
			t.Errorf("%q: no error", text)
			continue
		}
		if strings.Contains(err.Error(), "topsecret") {
			t.Errorf("%q: error leaks the secret: %v", text, err)
		}
	}
}
