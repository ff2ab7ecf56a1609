package narinfo

import "testing"

func TestPathHash(t *testing.T) {
	for in, want := range map[string]string{
		"/nix/store/0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-hello": "0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
		"0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-hello":            "0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
		"0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa":                  "0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
		"/nix/store/short":                                  "short",
	} {
		if got := PathHash(in); got != want {
			t.Errorf("PathHash(%q) = %q, want %q", in, got, want)
		}
	}
}
