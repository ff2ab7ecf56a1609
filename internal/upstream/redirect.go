package upstream

import (
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
)

// checkRedirect follows a redirect only within the upstream's origin.
// Another origin, even another port on the same host, is another server:
// Go's client would send it the netrc credentials whenever the host name
// matches, and a cache has no business sending us elsewhere (absolute URLs
// in narinfos are refused for the same reason, see checkRel).
func (c *Client) checkRedirect(req *http.Request, via []*http.Request) error {
	if len(via) > MaxRedirects {
		return fmt.Errorf("more than %d redirects, the last to %s: %w", MaxRedirects, describeURL(req.URL), ErrRedirectRefused)
	}
	if want, got := origin(c.base), origin(req.URL); got != want {
		return fmt.Errorf("redirect to %s leaves the upstream's origin %s: %w", describeURL(req.URL), want, ErrRedirectRefused)
	}
	return nil
}

// origin is scheme://host:port with the scheme's default port filled in, so
// "https://h" and "https://h:443" compare equal.
func origin(u *url.URL) string {
	scheme := strings.ToLower(u.Scheme)
	port := u.Port()
	if port == "" {
		switch scheme {
		case "http":
			port = "80"
		case "https":
			port = "443"
		}
	}
	return scheme + "://" + net.JoinHostPort(strings.ToLower(u.Hostname()), port)
}

// describeURL names a redirect target for an error message without its
// userinfo, query or fragment: a presigned URL's query is a credential.
func describeURL(u *url.URL) string {
	s := url.URL{Scheme: u.Scheme, Host: u.Host, Path: u.Path, RawPath: u.RawPath}
	text := s.String()
	if u.RawQuery != "" {
		text += "?(query omitted)"
	}
	return truncate(text)
}
