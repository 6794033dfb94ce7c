package iothub

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Topic filters a device subscribes to.
const (
	MethodsFilter      = "$iothub/methods/POST/#"
	TwinResponseFilter = "$iothub/twin/res/#"
	DesiredFilter      = "$iothub/twin/PATCH/properties/desired/#"
)

const (
	methodsPost   = "$iothub/methods/POST/"
	methodsRes    = "$iothub/methods/res/"
	twinGet       = "$iothub/twin/GET/"
	twinReported  = "$iothub/twin/PATCH/properties/reported/"
	twinDesired   = "$iothub/twin/PATCH/properties/desired/"
	twinRes       = "$iothub/twin/res/"
	devicesPrefix = "devices/"
)

// ErrTopic is wrapped by topic parse errors.
var ErrTopic = errors.New("iothub: invalid topic")

// MethodRequestTopic is where the hub publishes a direct-method call.
func MethodRequestTopic(method, rid string) string {
	return methodsPost + method + "/?" + Props{"$rid": rid}.Encode()
}

// MethodResponseTopic is where a device answers a direct-method call.
func MethodResponseTopic(status int, rid string) string {
	return methodsRes + strconv.Itoa(status) + "/?" + Props{"$rid": rid}.Encode()
}

// TwinGetTopic is where a device asks for its twin.
func TwinGetTopic(rid string) string {
	return twinGet + "?" + Props{"$rid": rid}.Encode()
}

// TwinReportedTopic is where a device patches its reported properties.
func TwinReportedTopic(rid string) string {
	return twinReported + "?" + Props{"$rid": rid}.Encode()
}

// TwinResponseTopic is the hub's answer to a twin request. version is the new
// reported $version of a 204 and is left out when not positive.
func TwinResponseTopic(status int, rid string, version int64) string {
	p := Props{"$rid": rid}
	if version > 0 {
		p["$version"] = strconv.FormatInt(version, 10)
	}
	return twinRes + strconv.Itoa(status) + "/?" + p.Encode()
}

// DesiredPatchTopic is where the hub sends a desired-properties patch.
func DesiredPatchTopic(version int64) string {
	return twinDesired + "?" + Props{"$version": strconv.FormatInt(version, 10)}.Encode()
}

// TelemetryTopic is where a device sends device-to-cloud messages.
func TelemetryTopic(deviceID string) string {
	return devicesPrefix + deviceID + "/messages/events/"
}

// C2DFilter is the filter for cloud-to-device messages.
func C2DFilter(deviceID string) string {
	return devicesPrefix + deviceID + "/messages/devicebound/#"
}

// Kind names what a topic is for.
type Kind string

// Topic kinds.
const (
	KindMethodRequest  Kind = "methodRequest"
	KindMethodResponse Kind = "methodResponse"
	KindTwinGet        Kind = "twinGet"
	KindTwinReported   Kind = "twinReported"
	KindTwinResponse   Kind = "twinResponse"
	KindDesiredPatch   Kind = "desiredPatch"
	KindTelemetry      Kind = "telemetry"
	KindC2D            Kind = "c2d"
)

// Topic is a parsed IoT Hub topic.
type Topic struct {
	Kind     Kind
	Method   string // KindMethodRequest
	Status   int    // KindMethodResponse, KindTwinResponse
	RID      string // $rid, byte for byte as sent
	Version  int64  // $version, when present
	DeviceID string // KindTelemetry, KindC2D
	ModuleID string // KindTelemetry, KindC2D of a module
	Props    Props  // the whole property bag
}

// ParseTopic parses any topic of the IoT Hub MQTT surface.
func ParseTopic(topic string) (Topic, error) {
	switch {
	case strings.HasPrefix(topic, "$iothub/"):
		return parseIotHubTopic(topic)
	case strings.HasPrefix(topic, devicesPrefix):
		return parseDeviceTopic(topic)
	}
	return Topic{}, fmt.Errorf("%w: %q is not an IoT Hub topic", ErrTopic, topic)
}

func parseIotHubTopic(topic string) (Topic, error) {
	i := strings.LastIndex(topic, "/?")
	if i < 0 {
		return Topic{}, fmt.Errorf("%w: %q has no property bag", ErrTopic, topic)
	}
	path, bag := topic[:i+1], topic[i+2:]
	props, err := ParseProps(bag)
	if err != nil {
		return Topic{}, fmt.Errorf("%w: %q: %v", ErrTopic, topic, err)
	}
	t := Topic{Props: props, RID: props["$rid"]}
	if v, ok := props["$version"]; ok {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			return Topic{}, fmt.Errorf("%w: %q: $version %q is not a number", ErrTopic, topic, v)
		}
		t.Version = n
	}
	needRID := true
	switch {
	case path == twinGet:
		t.Kind = KindTwinGet
	case path == twinReported:
		t.Kind = KindTwinReported
	case path == twinDesired:
		t.Kind = KindDesiredPatch
		needRID = false
		if _, ok := props["$version"]; !ok {
			return Topic{}, fmt.Errorf("%w: %q: $version is missing", ErrTopic, topic)
		}
	case strings.HasPrefix(path, twinRes):
		t.Kind = KindTwinResponse
		if t.Status, err = parseStatus(strings.TrimSuffix(path[len(twinRes):], "/")); err != nil {
			return Topic{}, fmt.Errorf("%w: %q: %v", ErrTopic, topic, err)
		}
	case strings.HasPrefix(path, methodsRes):
		t.Kind = KindMethodResponse
		if t.Status, err = parseStatus(strings.TrimSuffix(path[len(methodsRes):], "/")); err != nil {
			return Topic{}, fmt.Errorf("%w: %q: %v", ErrTopic, topic, err)
		}
	case strings.HasPrefix(path, methodsPost):
		t.Kind = KindMethodRequest
		t.Method = strings.TrimSuffix(path[len(methodsPost):], "/")
		if t.Method == "" || strings.Contains(t.Method, "/") {
			return Topic{}, fmt.Errorf("%w: %q: bad method name", ErrTopic, topic)
		}
	default:
		return Topic{}, fmt.Errorf("%w: %q is not a documented IoT Hub topic", ErrTopic, topic)
	}
	if needRID && t.RID == "" {
		return Topic{}, fmt.Errorf("%w: %q: $rid is missing", ErrTopic, topic)
	}
	return t, nil
}

func parseStatus(s string) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n < 100 || n > 999 || len(s) != 3 {
		return 0, fmt.Errorf("status %q is not a 3-digit number", s)
	}
	return n, nil
}

// parseDeviceTopic parses devices/{id}[/modules/{mod}]/messages/{events|devicebound}/[bag].
func parseDeviceTopic(topic string) (Topic, error) {
	rest := topic[len(devicesPrefix):]
	id, rest, ok := strings.Cut(rest, "/")
	if !ok || id == "" {
		return Topic{}, fmt.Errorf("%w: %q has no device id", ErrTopic, topic)
	}
	t := Topic{DeviceID: id}
	if m, ok := strings.CutPrefix(rest, "modules/"); ok {
		mod, r, ok := strings.Cut(m, "/")
		if !ok || mod == "" {
			return Topic{}, fmt.Errorf("%w: %q has no module id", ErrTopic, topic)
		}
		t.ModuleID, rest = mod, r
	}
	var bag string
	switch {
	case strings.HasPrefix(rest, "messages/events/"):
		t.Kind, bag = KindTelemetry, rest[len("messages/events/"):]
	case strings.HasPrefix(rest, "messages/devicebound/"):
		t.Kind, bag = KindC2D, rest[len("messages/devicebound/"):]
	default:
		return Topic{}, fmt.Errorf("%w: %q is not a documented device topic", ErrTopic, topic)
	}
	if strings.Contains(bag, "/") {
		return Topic{}, fmt.Errorf("%w: %q: property bag contains '/'", ErrTopic, topic)
	}
	props, err := ParseProps(strings.TrimPrefix(bag, "?"))
	if err != nil {
		return Topic{}, fmt.Errorf("%w: %q: %v", ErrTopic, topic, err)
	}
	t.Props = props
	return t, nil
}
