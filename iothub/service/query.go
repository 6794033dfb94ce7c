package service

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
)

// Query paging headers.
const (
	headerContinuation = "x-ms-continuation"
	headerMaxItems     = "x-ms-max-item-count"
	// MaxQueryPage is the largest page the SDKs ask for.
	MaxQueryPage = 1000
	// maxQueryPages bounds Query so a hub that keeps answering with a
	// continuation token cannot loop forever.
	maxQueryPages = 10000
)

// QueryPage runs one page of a query (POST /devices/query). pageSize 0 lets
// the hub choose. It returns the items and the continuation token of the next
// page, empty after the last.
func (c *Client) QueryPage(ctx context.Context, sql string, pageSize int, continuation string) ([]json.RawMessage, string, error) {
	if sql == "" {
		return nil, "", fmt.Errorf("%w: empty query", ErrInvalid)
	}
	if pageSize < 0 || pageSize > MaxQueryPage {
		return nil, "", fmt.Errorf("%w: page size %d (want 0 to %d)", ErrInvalid, pageSize, MaxQueryPage)
	}
	body, err := json.Marshal(map[string]string{"query": sql})
	if err != nil {
		return nil, "", fmt.Errorf("%w: query: %v", ErrInvalid, err)
	}
	h := http.Header{}
	if pageSize > 0 {
		h.Set(headerMaxItems, strconv.Itoa(pageSize))
	}
	if continuation != "" {
		h.Set(headerContinuation, continuation)
	}
	var items []json.RawMessage
	// A query only reads, so repeating it is safe.
	resp, err := c.call(ctx, request{method: http.MethodPost, path: "/devices/query", body: body, header: h, idempotent: true}, &items)
	if err != nil {
		return nil, "", fmt.Errorf("service: query: %w", err)
	}
	return items, resp.header.Get(headerContinuation), nil
}

// Query runs a query over all its pages and returns every item (twins,
// projections or aggregates, as the SELECT says).
func (c *Client) Query(ctx context.Context, sql string) ([]json.RawMessage, error) {
	var all []json.RawMessage
	token := ""
	for range maxQueryPages {
		items, next, err := c.QueryPage(ctx, sql, MaxQueryPage, token)
		if err != nil {
			return nil, err
		}
		all = append(all, items...)
		if next == "" {
			return all, nil
		}
		token = next
	}
	return nil, fmt.Errorf("service: query: more than %d pages", maxQueryPages)
}
