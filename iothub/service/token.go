package service

import (
	"fmt"
	"sync"
	"time"

	"github.com/gwagent/gwagent/iothub"
)

// tokenSource mints the policy SAS token (sr={host}, skn={policy}) and keeps
// it until most of its lifetime is used, so a burst of calls does not sign a
// token each.
type tokenSource struct {
	host    string
	keyName string
	key     []byte        // nil when the connection string carried a ready-made token
	fixed   string        // that ready-made token; it cannot be renewed
	fixedAt time.Time     // its expiry
	ttl     time.Duration // lifetime of minted tokens
	now     func() time.Time

	mu     sync.Mutex // guards token and expiry
	token  string
	expiry time.Time
}

func newTokenSource(cs iothub.ConnectionString, ttl time.Duration, now func() time.Time) (*tokenSource, error) {
	ts := &tokenSource{host: cs.HostName, keyName: cs.SharedAccessKeyName, ttl: ttl, now: now}
	if cs.SharedAccessSignature != "" && cs.SharedAccessKey == "" {
		sas, err := iothub.ParseSAS(cs.SharedAccessSignature)
		if err != nil {
			return nil, fmt.Errorf("service: connection string: %w", err)
		}
		ts.fixed, ts.fixedAt = cs.SharedAccessSignature, sas.Expiry
		return ts, nil
	}
	key, err := cs.Key()
	if err != nil {
		return nil, fmt.Errorf("service: %w", err)
	}
	ts.key = key
	return ts, nil
}

// Token returns a token valid for at least a fifth of the TTL. A minted token
// is renewed once 80% of its lifetime has passed (the C SDK's refresh point),
// which leaves room for clock skew between this machine and the hub.
func (t *tokenSource) Token() (string, error) {
	now := t.now()
	if t.key == nil {
		if !now.Before(t.fixedAt) {
			return "", fmt.Errorf("%w: the connection string's SharedAccessSignature expired at %s",
				iothub.ErrSASExpired, t.fixedAt.UTC().Format(time.RFC3339))
		}
		return t.fixed, nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.token == "" || !now.Before(t.expiry.Add(-t.ttl/5)) {
		t.expiry = now.Add(t.ttl)
		t.token = iothub.NewSAS(t.host, t.key, t.keyName, t.expiry)
	}
	return t.token, nil
}
