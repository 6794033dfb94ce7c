package firmware

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
)

// Where images may come from. An image's integrity rests on its SHA-256 and
// signature, but the agent still does not let a server move a download to
// plain http (an on-path attacker could then see and hold it back), and an
// operator can name the hosts images may come from at all
// (Config.AllowedHosts), redirects included.

// maxRedirects is how many redirects one request follows (as net/http).
const maxRedirects = 10

// RedirectError is a redirect the download refused.
type RedirectError struct {
	From, To string // the URLs, without query or user info
	Reason   string
}

func (e *RedirectError) Error() string {
	return fmt.Sprintf("refusing the redirect from %s to %s: %s", e.From, e.To, e.Reason)
}

// ValidHostPattern checks one entry of Config.AllowedHosts: a host name or
// IP address ("fw.example.com", "192.0.2.7", "::1"), or "*." and a domain
// ("*.example.com": any name below it, not example.com itself). No scheme,
// port or path.
func ValidHostPattern(p string) error {
	name, wild := strings.CutPrefix(p, "*.")
	switch {
	case strings.TrimSpace(p) == "":
		return errors.New("empty host name")
	case p == "*":
		return errors.New(`"*": leave the list empty to allow any host`)
	case strings.Contains(p, "://"):
		return fmt.Errorf("%q: a host name, not a URL", p)
	case strings.ContainsAny(p, "/?#@ \t"):
		return fmt.Errorf("%q: a host name only, without a path or user", p)
	}
	if !wild && parseIP(p) != nil {
		return nil
	}
	if strings.Contains(name, ":") {
		return fmt.Errorf("%q: a host name without a port", p)
	}
	if strings.Contains(name, "*") {
		return fmt.Errorf("%q: \"*\" only as the first label, as in *.example.com", p)
	}
	for _, label := range strings.Split(strings.TrimSuffix(name, "."), ".") {
		if label == "" || len(label) > 63 || strings.HasPrefix(label, "-") || strings.HasSuffix(label, "-") {
			return fmt.Errorf("%q: not a host name", p)
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
				return fmt.Errorf("%q: not a host name (%q)", p, r)
			}
		}
	}
	return nil
}

func parseIP(s string) net.IP {
	return net.ParseIP(strings.TrimSuffix(strings.TrimPrefix(s, "["), "]"))
}

// hostPatterns is Config.AllowedHosts, normalised; empty allows any host.
type hostPatterns []string

func newHostPatterns(list []string) (hostPatterns, error) {
	var out hostPatterns
	for _, p := range list {
		p = strings.TrimSpace(p)
		if err := ValidHostPattern(p); err != nil {
			return nil, err
		}
		out = append(out, normalHost(p))
	}
	return out, nil
}

// normalHost is a host for comparison: lower case, without a trailing dot,
// an IP address in its canonical form.
func normalHost(h string) string {
	if ip := parseIP(h); ip != nil {
		return ip.String()
	}
	return strings.ToLower(strings.TrimSuffix(h, "."))
}

// allows reports whether host (a URL's Hostname) may serve images.
func (hp hostPatterns) allows(host string) bool {
	if len(hp) == 0 {
		return true
	}
	host = normalHost(host)
	for _, p := range hp {
		if suffix, ok := strings.CutPrefix(p, "*."); ok {
			if strings.HasSuffix(host, "."+suffix) {
				return true
			}
		} else if host == p {
			return true
		}
	}
	return false
}

func (hp hostPatterns) String() string { return strings.Join(hp, ", ") }

// checkHost is Start's check of a request URL: its host must be allowed.
func (m *Manager) checkHost(field, raw string) error {
	u, err := url.Parse(raw)
	if err != nil {
		return invalid("%s is not a valid URL: %v", field, err)
	}
	if !m.hosts.allows(u.Hostname()) {
		return invalid("%s: host %q is not an allowed download host (update.allowedHosts: %s)", field, u.Hostname(), m.hosts)
	}
	return nil
}

// checkRedirect is the download client's CheckRedirect: it refuses
// redirects from https to http and to hosts that are not allowed, then
// asks the client's own policy, if any.
func (m *Manager) checkRedirect(next func(*http.Request, []*http.Request) error) func(*http.Request, []*http.Request) error {
	return func(req *http.Request, via []*http.Request) error {
		if len(via) >= maxRedirects {
			return fmt.Errorf("stopped after %d redirects", maxRedirects)
		}
		from, to := via[len(via)-1].URL, req.URL
		refuse := func(why string) error {
			return &RedirectError{From: redactURI(from.String()), To: redactURI(to.String()), Reason: why}
		}
		if strings.EqualFold(from.Scheme, "https") && !strings.EqualFold(to.Scheme, "https") {
			return refuse("it would downgrade https to plain " + to.Scheme)
		}
		if !m.hosts.allows(to.Hostname()) {
			return refuse(fmt.Sprintf("host %q is not an allowed download host (update.allowedHosts: %s)", to.Hostname(), m.hosts))
		}
		if next != nil {
			return next(req, via)
		}
		return nil
	}
}
