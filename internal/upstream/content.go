package upstream

import (
	"bytes"
	"mime"
	"net/http"
	"net/url"
	"strings"
)

// notCacheData is the error for an HTML page served in place of a file.
func (c *Client) notCacheData(status int, rel, evidence string) error {
	return c.unavailable(status, "GET %s: %s: %w", rel, truncate(evidence), ErrNotCacheData)
}

// isHTML reports whether a Content-Type names an HTML document. No binary
// cache serves any file as HTML, so such an answer is always an error page.
func isHTML(contentType string) bool {
	mt, _, err := mime.ParseMediaType(contentType)
	if err != nil {
		// A malformed parameter must not hide the type itself.
		mt, _, _ = strings.Cut(contentType, ";")
		mt = strings.ToLower(strings.TrimSpace(mt))
	}
	return mt == "text/html" || mt == "application/xhtml+xml"
}

// startsWithMarkup reports whether the first byte after an optional UTF-8
// byte order mark and whitespace is "<", as in every HTML or XML page.
func startsWithMarkup(b []byte) bool {
	b = bytes.TrimPrefix(b, []byte("\xef\xbb\xbf"))
	b = bytes.TrimLeft(b, " \t\r\n\f\v")
	return len(b) > 0 && b[0] == '<'
}

// identityEncoded reports whether the body is the file's own bytes. Go's
// transport removes Content-Encoding when it decodes gzip itself; anything
// still named (S3 serves .ls files brotli-encoded) is binary.
func identityEncoded(resp *http.Response) bool {
	ce := strings.TrimSpace(resp.Header.Get("Content-Encoding"))
	return ce == "" || strings.EqualFold(ce, "identity")
}

// isBuildLog reports whether ref names a build log (log/<drv>), whose text
// is whatever the build printed.
func isBuildLog(ref *url.URL) bool {
	return strings.HasPrefix(ref.Path, "log/")
}
