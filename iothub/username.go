package iothub

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// ErrUsername is wrapped by MQTT username parse errors.
var ErrUsername = errors.New("iothub: invalid MQTT username")

// Username builds the MQTT CONNECT username for a device:
// "{host}/{deviceId}/?api-version=…&DeviceClientType=…". Ids are never
// URL-encoded; the client type is.
func Username(host, deviceID, clientType string) string {
	u := host + "/" + deviceID + "/?api-version=" + APIVersion
	if clientType != "" {
		u += "&DeviceClientType=" + url.QueryEscape(clientType)
	}
	return u
}

// UsernameInfo is a parsed MQTT username.
type UsernameInfo struct {
	Host     string
	DeviceID string
	ModuleID string // empty for a device identity
	Props    Props  // api-version, DeviceClientType, model-id, …
}

// ParseUsername accepts both forms seen in the wild:
// "{host}/{dev}[/{mod}]/?api-version=…" and "{host}/{dev}[/{mod}]/api-version=…".
// A non-empty api-version is required.
func ParseUsername(u string) (UsernameInfo, error) {
	var ids, bag string
	if i := strings.Index(u, "/?"); i >= 0 {
		ids, bag = u[:i], u[i+2:]
	} else if i := strings.LastIndex(u, "/"); i >= 0 && strings.Contains(u[i+1:], "=") {
		ids, bag = u[:i], u[i+1:]
	} else {
		return UsernameInfo{}, fmt.Errorf("%w: no property bag with api-version", ErrUsername)
	}
	props, err := ParseProps(bag)
	if err != nil {
		return UsernameInfo{}, fmt.Errorf("%w: %v", ErrUsername, err)
	}
	if props["api-version"] == "" {
		return UsernameInfo{}, fmt.Errorf("%w: api-version is missing", ErrUsername)
	}
	parts := strings.Split(ids, "/")
	if len(parts) < 2 || len(parts) > 3 {
		return UsernameInfo{}, fmt.Errorf("%w: want host/deviceId[/moduleId], got %q", ErrUsername, ids)
	}
	for _, p := range parts {
		if p == "" {
			return UsernameInfo{}, fmt.Errorf("%w: empty segment in %q", ErrUsername, ids)
		}
	}
	info := UsernameInfo{Host: parts[0], DeviceID: parts[1], Props: props}
	if len(parts) == 3 {
		info.ModuleID = parts[2]
	}
	return info, nil
}
