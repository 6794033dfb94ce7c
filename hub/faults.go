package hub

import (
	"time"

	"github.com/gwagent/gwagent/iothub"
)

// TwinOp selects the twin requests a TwinFault applies to.
type TwinOp int

// Twin operations.
const (
	TwinAny      TwinOp = iota // GET and reported PATCH
	TwinGet                    // $iothub/twin/GET
	TwinReported               // $iothub/twin/PATCH/properties/reported
)

// TwinFault changes how the hub answers a device's next twin requests, for
// testing how a device copes with an unhealthy hub.
type TwinFault struct {
	Op TwinOp
	// Count is how many requests the fault applies to; 0 means every
	// request until ClearTwinFaults.
	Count int
	// Delay holds the request this long before it is handled. Later
	// requests of the device wait behind it, as they would at IoT Hub.
	Delay time.Duration
	// Status, if not 0, answers $iothub/twin/res/{Status} with an IoT Hub
	// error body instead of handling the request (e.g. 429, 500, 503).
	Status int
	// Disconnect handles the request (a reported patch is stored) but
	// closes the connection instead of answering: the device got its
	// PUBACK and never sees the response.
	Disconnect bool
}

// InjectTwinFault adds a fault for a device's twin requests. Faults apply
// in the order they were added; each request consumes at most one.
func (h *Hub) InjectTwinFault(deviceID string, f TwinFault) {
	h.faultMu.Lock()
	defer h.faultMu.Unlock()
	fc := f
	h.faults[deviceID] = append(h.faults[deviceID], &fc)
}

// ClearTwinFaults removes every fault of a device.
func (h *Hub) ClearTwinFaults(deviceID string) {
	h.faultMu.Lock()
	defer h.faultMu.Unlock()
	delete(h.faults, deviceID)
}

// takeFault returns the fault that applies to this request, if any, and
// counts it.
func (h *Hub) takeFault(deviceID string, kind iothub.Kind) *TwinFault {
	h.faultMu.Lock()
	defer h.faultMu.Unlock()
	list := h.faults[deviceID]
	for i, f := range list {
		if !f.matches(kind) {
			continue
		}
		out := *f
		if f.Count > 0 {
			f.Count--
			if f.Count == 0 {
				list = append(list[:i:i], list[i+1:]...)
				if len(list) == 0 {
					delete(h.faults, deviceID)
				} else {
					h.faults[deviceID] = list
				}
			}
		}
		return &out
	}
	return nil
}

func (f *TwinFault) matches(kind iothub.Kind) bool {
	switch f.Op {
	case TwinGet:
		return kind == iothub.KindTwinGet
	case TwinReported:
		return kind == iothub.KindTwinReported
	default:
		return true
	}
}
