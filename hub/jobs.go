package hub

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/gwagent/gwagent/internal/atomicfile"
	"github.com/gwagent/gwagent/iothub"
)

// Jobs v2: scheduled direct-method calls and twin updates over the devices
// a query condition selects, run in the background at a paced rate.

// Job types and statuses, as IoT Hub spells them.
const (
	JobTypeDeviceMethod = "scheduleDeviceMethod"
	JobTypeUpdateTwin   = "scheduleUpdateTwin"

	JobQueued    = "queued"
	JobRunning   = "running"
	JobCompleted = "completed"
	JobFailed    = "failed"
	JobCancelled = "cancelled"

	// Per-device statuses (devices.jobs).
	deviceJobPending   = "pending"
	deviceJobRunning   = "running"
	deviceJobCompleted = "completed"
	deviceJobFailed    = "failed"
	deviceJobCancelled = "cancelled"
)

// DefaultJobDeviceRate is how many device operations per second a job
// starts: IoT Hub's figure for an S1 unit (10/s).
const DefaultJobDeviceRate = 10

// jobInFlight bounds the device operations of one job that wait for an
// answer at the same time.
const jobInFlight = 16

// jobsFile holds every job, in the state directory.
const jobsFile = "jobs.json"

// jobsFormat is the version of the jobs file.
const jobsFormat = 1

// codeJobNotFound is IoT Hub's error for an unknown job id.
const codeJobNotFound = 404002

// jobRecord is a job with its per-device results, as stored and served.
type jobRecord struct {
	JobID          string                `json:"jobId"`
	Type           string                `json:"type"`
	Status         string                `json:"status"`
	QueryCondition string                `json:"queryCondition"`
	CreatedTime    time.Time             `json:"createdTime"`
	StartTime      time.Time             `json:"startTime"`
	EndTime        time.Time             `json:"endTime"`
	MaxExecSeconds int64                 `json:"maxExecutionTimeInSeconds"`
	Method         *iothub.MethodRequest `json:"cloudToDeviceMethod,omitempty"`
	UpdateTwin     json.RawMessage       `json:"updateTwin,omitempty"`
	FailureReason  string                `json:"failureReason,omitempty"`
	StatusMessage  string                `json:"statusMessage,omitempty"`
	// Devices are the devices the condition selected when the job started,
	// ordered by id; empty while queued.
	Devices []deviceJob `json:"devices,omitempty"`
}

type deviceJob struct {
	DeviceID    string               `json:"deviceId"`
	Status      string               `json:"status"`
	Created     time.Time            `json:"created"`
	Start       time.Time            `json:"start"`
	End         time.Time            `json:"end"`
	LastUpdated time.Time            `json:"lastUpdated"`
	Response    *iothub.MethodResult `json:"response,omitempty"`
	ErrCode     string               `json:"errorCode,omitempty"`
	ErrText     string               `json:"errorText,omitempty"`
}

// jobStats is deviceJobStatistics.
type jobStats struct {
	DeviceCount    int `json:"deviceCount"`
	FailedCount    int `json:"failedCount"`
	SucceededCount int `json:"succeededCount"`
	RunningCount   int `json:"runningCount"`
	PendingCount   int `json:"pendingCount"`
}

// jobView is a job as GET /jobs/v2/{id} answers it.
type jobView struct {
	JobID                     string                `json:"jobId"`
	Type                      string                `json:"type"`
	Status                    string                `json:"status"`
	QueryCondition            string                `json:"queryCondition"`
	CreatedTime               string                `json:"createdTime"`
	StartTime                 string                `json:"startTime"`
	EndTime                   string                `json:"endTime,omitempty"`
	MaxExecutionTimeInSeconds int64                 `json:"maxExecutionTimeInSeconds"`
	CloudToDeviceMethod       *iothub.MethodRequest `json:"cloudToDeviceMethod,omitempty"`
	UpdateTwin                json.RawMessage       `json:"updateTwin,omitempty"`
	FailureReason             string                `json:"failureReason,omitempty"`
	StatusMessage             string                `json:"statusMessage,omitempty"`
	DeviceJobStatistics       jobStats              `json:"deviceJobStatistics"`
}

// deviceJobView is one row of SELECT * FROM devices.jobs.
type deviceJobView struct {
	DeviceID               string         `json:"deviceId"`
	JobID                  string         `json:"jobId"`
	JobType                string         `json:"jobType"`
	Status                 string         `json:"status"`
	StartTimeUtc           string         `json:"startTimeUtc"`
	EndTimeUtc             string         `json:"endTimeUtc"`
	CreatedDateTimeUtc     string         `json:"createdDateTimeUtc"`
	LastUpdatedDateTimeUtc string         `json:"lastUpdatedDateTimeUtc"`
	Outcome                map[string]any `json:"outcome,omitempty"`
	Error                  map[string]any `json:"error,omitempty"`
}

func (j *jobRecord) stats() jobStats {
	s := jobStats{DeviceCount: len(j.Devices)}
	for _, d := range j.Devices {
		switch d.Status {
		case deviceJobCompleted:
			s.SucceededCount++
		case deviceJobFailed, deviceJobCancelled:
			s.FailedCount++
		case deviceJobRunning:
			s.RunningCount++
		default:
			s.PendingCount++
		}
	}
	return s
}

func (j *jobRecord) view() jobView {
	v := jobView{
		JobID: j.JobID, Type: j.Type, Status: j.Status, QueryCondition: j.QueryCondition,
		CreatedTime: formatTime(j.CreatedTime), StartTime: formatTime(j.StartTime),
		MaxExecutionTimeInSeconds: j.MaxExecSeconds, CloudToDeviceMethod: j.Method, UpdateTwin: j.UpdateTwin,
		FailureReason: j.FailureReason, StatusMessage: j.StatusMessage, DeviceJobStatistics: j.stats(),
	}
	if !j.EndTime.IsZero() {
		v.EndTime = formatTime(j.EndTime)
	}
	return v
}

func (j *jobRecord) deviceView(d *deviceJob) deviceJobView {
	v := deviceJobView{
		DeviceID: d.DeviceID, JobID: j.JobID, JobType: j.Type, Status: d.Status,
		StartTimeUtc: formatTime(d.Start), EndTimeUtc: formatTime(d.End),
		CreatedDateTimeUtc: formatTime(d.Created), LastUpdatedDateTimeUtc: formatTime(d.LastUpdated),
	}
	if d.Response != nil {
		v.Outcome = map[string]any{"deviceMethodResponse": d.Response}
	}
	if d.ErrCode != "" {
		v.Error = map[string]any{"code": d.ErrCode, "description": d.ErrText}
	}
	return v
}

func terminal(status string) bool {
	return status == JobCompleted || status == JobFailed || status == JobCancelled
}

// jobs is the hub's job table. Every job record is guarded by mu; the
// file is rewritten under mu.
type jobs struct {
	path string
	rate float64 // device operations started per second

	mu     sync.Mutex
	byID   map[string]*jobRecord
	cancel map[string]context.CancelFunc // running or queued jobs
	saved  time.Time                     // last write of the file
}

type jobsFileData struct {
	Format int          `json:"format"`
	Jobs   []*jobRecord `json:"jobs"`
}

func openJobs(dir string, rate float64) (*jobs, error) {
	js := &jobs{path: filepath.Join(dir, jobsFile), rate: rate, byID: map[string]*jobRecord{}, cancel: map[string]context.CancelFunc{}}
	b, err := os.ReadFile(js.path)
	if errors.Is(err, os.ErrNotExist) || err == nil && len(b) == 0 {
		return js, nil
	}
	if err != nil {
		return nil, fmt.Errorf("hub: read jobs: %w", err)
	}
	var f jobsFileData
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("hub: jobs file %s: %w", js.path, err)
	}
	if f.Format > jobsFormat {
		return nil, fmt.Errorf("hub: jobs file %s has format %d, newer than %d", js.path, f.Format, jobsFormat)
	}
	for _, j := range f.Jobs {
		js.byID[j.JobID] = j
	}
	return js, nil
}

// save writes every job. The caller holds mu.
func (js *jobs) save() error {
	f := jobsFileData{Format: jobsFormat}
	for _, j := range js.byID {
		f.Jobs = append(f.Jobs, j)
	}
	slices.SortFunc(f.Jobs, func(a, b *jobRecord) int { return strings.Compare(a.JobID, b.JobID) })
	b, err := json.Marshal(f)
	if err != nil {
		return err
	}
	js.saved = time.Now()
	return atomicfile.WriteFile(js.path, b, 0o600)
}

// jobRequest is the body of PUT /jobs/v2/{id}.
type jobRequest struct {
	JobID                     string                `json:"jobId"`
	Type                      string                `json:"type"`
	CloudToDeviceMethod       *iothub.MethodRequest `json:"cloudToDeviceMethod"`
	UpdateTwin                json.RawMessage       `json:"updateTwin"`
	QueryCondition            string                `json:"queryCondition"`
	StartTime                 *string               `json:"startTime"`
	MaxExecutionTimeInSeconds *int64                `json:"maxExecutionTimeInSeconds"`
}

func badJob(format string, args ...any) *svcError {
	return errf(http.StatusBadRequest, iothub.CodeArgumentInvalid, format, args...)
}

// jobCondition parses a job's query condition (a WHERE clause).
func jobCondition(cond string) (*Query, error) {
	if strings.TrimSpace(cond) == "" {
		return nil, fmt.Errorf("%w: queryCondition is empty", ErrQuery)
	}
	return ParseQuery("SELECT * FROM devices WHERE " + cond)
}

// newJob checks a job request and builds the job it asks for.
func newJob(id string, b []byte, now time.Time) (*jobRecord, *svcError) {
	var req jobRequest
	if err := json.Unmarshal(b, &req); err != nil {
		return nil, errf(http.StatusBadRequest, iothub.CodeIotHubFormatError, "Job request is not valid JSON: %v", err)
	}
	if req.JobID != "" && req.JobID != id {
		return nil, badJob("jobId %q in the body does not match %q in the path", req.JobID, id)
	}
	if id == "" || len(id) > 128 {
		return nil, badJob("jobId must be 1 to 128 characters")
	}
	j := &jobRecord{JobID: id, Type: req.Type, Status: JobQueued, QueryCondition: req.QueryCondition, CreatedTime: now, StartTime: now, MaxExecSeconds: 3600}
	switch req.Type {
	case JobTypeDeviceMethod:
		m := req.CloudToDeviceMethod
		if m == nil || !iothub.ValidMethodName(m.MethodName) {
			return nil, badJob("cloudToDeviceMethod needs a valid methodName")
		}
		if m.ResponseTimeoutInSeconds == 0 {
			m.ResponseTimeoutInSeconds = iothub.DefaultMethodResponseTimeout
		}
		if m.ResponseTimeoutInSeconds < iothub.MinMethodResponseTimeout || m.ResponseTimeoutInSeconds > iothub.MaxMethodResponseTimeout {
			return nil, badJob("responseTimeoutInSeconds must be between %d and %d", iothub.MinMethodResponseTimeout, iothub.MaxMethodResponseTimeout)
		}
		if m.ConnectTimeoutInSeconds < 0 || m.ConnectTimeoutInSeconds > iothub.MaxMethodConnectTimeout {
			return nil, badJob("connectTimeoutInSeconds must be between 0 and %d", iothub.MaxMethodConnectTimeout)
		}
		if len(m.Payload) > iothub.MaxMethodPayload {
			return nil, errf(http.StatusRequestEntityTooLarge, iothub.CodeMessageTooLarge, "Method payload of %d bytes is over the limit of %d", len(m.Payload), iothub.MaxMethodPayload)
		}
		j.Method = m
	case JobTypeUpdateTwin:
		if len(req.UpdateTwin) == 0 || string(req.UpdateTwin) == "null" {
			return nil, badJob("updateTwin is required for %s", JobTypeUpdateTwin)
		}
		if _, err := decodeTwinUpdate(req.UpdateTwin); err != nil {
			return nil, badJob("updateTwin: %v", err)
		}
		j.UpdateTwin = req.UpdateTwin
	default:
		return nil, badJob("type must be %s or %s, not %q", JobTypeDeviceMethod, JobTypeUpdateTwin, req.Type)
	}
	if _, err := jobCondition(req.QueryCondition); err != nil {
		return nil, badJob("queryCondition is not valid: %v", err)
	}
	if req.StartTime != nil && *req.StartTime != "" {
		t, err := time.Parse(time.RFC3339Nano, *req.StartTime)
		if err != nil {
			return nil, badJob("startTime %q is not an ISO 8601 time", *req.StartTime)
		}
		if t.After(now) {
			j.StartTime = t
		}
	}
	if req.MaxExecutionTimeInSeconds != nil {
		if *req.MaxExecutionTimeInSeconds <= 0 {
			return nil, badJob("maxExecutionTimeInSeconds must be positive")
		}
		j.MaxExecSeconds = *req.MaxExecutionTimeInSeconds
	}
	return j, nil
}

// scheduleJob stores a new job and starts its runner.
func (h *Hub) scheduleJob(id string, body []byte) (jobView, *svcError) {
	j, serr := newJob(id, body, time.Now())
	if serr != nil {
		return jobView{}, serr
	}
	js := h.jobs
	js.mu.Lock()
	defer js.mu.Unlock()
	if _, ok := js.byID[id]; ok {
		return jobView{}, errf(http.StatusConflict, iothub.CodeDeviceAlreadyExists, "A job with id %s already exists", id)
	}
	js.byID[id] = j
	if err := js.save(); err != nil {
		delete(js.byID, id)
		h.log.Error("job not stored", zap.String("job_id", id), zap.Error(err))
		return jobView{}, errf(http.StatusInternalServerError, iothub.CodeServerError, "internal error")
	}
	h.startJobLocked(j)
	h.log.Info("job scheduled", zap.String("job_id", id), zap.String("type", j.Type), zap.String("query", j.QueryCondition))
	return j.view(), nil
}

// startJobLocked starts the runner of a queued or running job. The caller
// holds js.mu.
func (h *Hub) startJobLocked(j *jobRecord) {
	ctx, cancel := context.WithCancel(h.ctx)
	h.jobs.cancel[j.JobID] = cancel
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		defer cancel()
		h.runJob(ctx, j)
	}()
}

// resumeJobs restarts the jobs a previous run left queued or running.
// Devices whose operation was under way when the hub stopped are failed:
// whether the device got the call is unknown.
func (h *Hub) resumeJobs() {
	js := h.jobs
	js.mu.Lock()
	defer js.mu.Unlock()
	now := time.Now()
	for _, j := range js.byID {
		if terminal(j.Status) {
			continue
		}
		for i := range j.Devices {
			if d := &j.Devices[i]; d.Status == deviceJobRunning {
				d.Status, d.End, d.LastUpdated = deviceJobFailed, now, now
				d.ErrCode, d.ErrText = "ServerError", "The hub restarted while the operation was under way"
			}
		}
		h.startJobLocked(j)
	}
}

// runJob waits for the job's start time, selects the devices and runs the
// operation on each, starting at most rate per second.
func (h *Hub) runJob(ctx context.Context, j *jobRecord) {
	js := h.jobs
	js.mu.Lock()
	start := j.StartTime
	js.mu.Unlock()
	if wait := time.Until(start); wait > 0 {
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return // cancelled (status set by cancelJob) or hub closed
		}
	}
	js.mu.Lock()
	if j.Status == JobQueued {
		ids, err := h.selectDevices(j.QueryCondition)
		if err != nil {
			h.finishJobLocked(j, JobFailed, "The query condition could not be evaluated: "+err.Error())
			js.mu.Unlock()
			return
		}
		now := time.Now()
		j.Devices = make([]deviceJob, len(ids))
		for i, id := range ids {
			j.Devices[i] = deviceJob{DeviceID: id, Status: deviceJobPending, Created: now, LastUpdated: now}
		}
		j.Status = JobRunning
		h.saveJobsLocked(true)
	}
	deadline := j.StartTime.Add(time.Duration(j.MaxExecSeconds) * time.Second)
	js.mu.Unlock()

	runCtx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	interval := time.Duration(float64(time.Second) / js.rate)
	sem := make(chan struct{}, jobInFlight)
	var wg sync.WaitGroup
	var next time.Time
	for i := range j.Devices {
		js.mu.Lock()
		pending := j.Devices[i].Status == deviceJobPending
		js.mu.Unlock()
		if !pending {
			continue
		}
		if wait := time.Until(next); wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-runCtx.Done():
				t.Stop()
			}
		}
		if runCtx.Err() != nil {
			break
		}
		select {
		case sem <- struct{}{}:
		case <-runCtx.Done():
		}
		if runCtx.Err() != nil {
			break
		}
		next = time.Now().Add(interval)
		js.mu.Lock()
		now := time.Now()
		j.Devices[i].Status, j.Devices[i].Start, j.Devices[i].LastUpdated = deviceJobRunning, now, now
		js.mu.Unlock()
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			h.runDeviceJob(runCtx, j, i)
		}(i)
	}
	wg.Wait()

	js.mu.Lock()
	defer js.mu.Unlock()
	if terminal(j.Status) {
		return // cancelled
	}
	switch {
	case ctx.Err() != nil:
		// The hub is closing: the job stays running and resumes at the
		// next start.
		h.saveJobsLocked(true)
	case runCtx.Err() != nil:
		h.finishJobLocked(j, JobFailed, fmt.Sprintf("The job did not finish within maxExecutionTimeInSeconds (%d)", j.MaxExecSeconds))
	default:
		h.finishJobLocked(j, JobCompleted, "")
	}
}

// finishJobLocked ends a job: devices not yet done end with it. The caller
// holds js.mu.
func (h *Hub) finishJobLocked(j *jobRecord, status, reason string) {
	now := time.Now()
	for i := range j.Devices {
		d := &j.Devices[i]
		if d.Status == deviceJobPending || d.Status == deviceJobRunning {
			if status == JobCancelled {
				d.Status = deviceJobCancelled
			} else {
				d.Status, d.ErrCode, d.ErrText = deviceJobFailed, "JobExpired", reason
			}
			d.End, d.LastUpdated = now, now
		}
	}
	j.Status, j.EndTime, j.FailureReason = status, now, reason
	delete(h.jobs.cancel, j.JobID)
	h.saveJobsLocked(true)
	h.log.Info("job ended", zap.String("job_id", j.JobID), zap.String("status", status), zap.Any("stats", j.stats()))
}

// saveJobsLocked writes the jobs file; per-device progress is written at
// most once a second, job transitions always. The caller holds js.mu.
func (h *Hub) saveJobsLocked(force bool) {
	if !force && time.Since(h.jobs.saved) < time.Second {
		return
	}
	if err := h.jobs.save(); err != nil {
		h.log.Error("jobs not stored", zap.Error(err))
	}
}

// runDeviceJob runs the job's operation on one device and records the
// outcome.
func (h *Hub) runDeviceJob(ctx context.Context, j *jobRecord, i int) {
	js := h.jobs
	js.mu.Lock()
	id := j.Devices[i].DeviceID
	js.mu.Unlock()
	var res *iothub.MethodResult
	var serr *svcError
	switch j.Type {
	case JobTypeDeviceMethod:
		r, err := h.invoke(ctx, id, *j.Method)
		if err == nil {
			res = &r
		}
		serr = err
	case JobTypeUpdateTwin:
		if err := h.throttle.wait(ctx); err != nil {
			serr = errf(http.StatusServiceUnavailable, iothub.CodeServiceUnavailable, "job stopped while throttled: %v", err)
			break
		}
		_, serr = h.updateTwin(id, j.UpdateTwin, "", false)
		if serr == nil {
			h.throttle.done(time.Now())
		}
	}
	js.mu.Lock()
	defer js.mu.Unlock()
	d := &j.Devices[i]
	if d.Status != deviceJobRunning {
		return // the job ended meanwhile
	}
	if h.ctx.Err() != nil {
		return // the hub is closing: resumeJobs settles this device at the next start
	}
	now := time.Now()
	d.End, d.LastUpdated, d.Response = now, now, res
	if serr != nil {
		d.Status = deviceJobFailed
		d.ErrCode = errorNames[serr.code]
		if d.ErrCode == "" {
			d.ErrCode = fmt.Sprint(serr.code)
		}
		d.ErrText = serr.msg
	} else {
		d.Status = deviceJobCompleted
	}
	h.saveJobsLocked(false)
}

// selectDevices lists the ids of the devices whose twin matches cond.
func (h *Hub) selectDevices(cond string) ([]string, error) {
	q, err := jobCondition(cond)
	if err != nil {
		return nil, err
	}
	twins, err := h.query(q)
	if err != nil {
		return nil, err
	}
	ids := make([]string, 0, len(twins))
	for _, t := range twins {
		var v struct {
			DeviceID string `json:"deviceId"`
		}
		if err := json.Unmarshal(t, &v); err != nil {
			return nil, err
		}
		ids = append(ids, v.DeviceID)
	}
	return ids, nil
}

func jobNotFound(id string) *svcError {
	return errf(http.StatusNotFound, codeJobNotFound, "Job with ID '%s' not found", id)
}

func (h *Hub) getJob(id string) (jobView, *svcError) {
	h.jobs.mu.Lock()
	defer h.jobs.mu.Unlock()
	j := h.jobs.byID[id]
	if j == nil {
		return jobView{}, jobNotFound(id)
	}
	return j.view(), nil
}

// cancelJob cancels a queued or running job; operations already sent to a
// device are not called back. A job that has ended is answered as it is.
func (h *Hub) cancelJob(id string) (jobView, *svcError) {
	js := h.jobs
	js.mu.Lock()
	defer js.mu.Unlock()
	j := js.byID[id]
	if j == nil {
		return jobView{}, jobNotFound(id)
	}
	if !terminal(j.Status) {
		if c := js.cancel[id]; c != nil {
			c()
		}
		h.finishJobLocked(j, JobCancelled, "")
	}
	return j.view(), nil
}

// listJobs answers GET /jobs/v2/query: the jobs of a type and status (empty:
// any), ordered by creation time.
func (h *Hub) listJobs(jobType, status string) []jobView {
	js := h.jobs
	js.mu.Lock()
	defer js.mu.Unlock()
	var all []*jobRecord
	for _, j := range js.byID {
		if (jobType == "" || j.Type == jobType) && (status == "" || j.Status == status) {
			all = append(all, j)
		}
	}
	slices.SortFunc(all, func(a, b *jobRecord) int {
		if c := a.CreatedTime.Compare(b.CreatedTime); c != 0 {
			return c
		}
		return strings.Compare(a.JobID, b.JobID)
	})
	out := make([]jobView, 0, len(all))
	for _, j := range all {
		out = append(out, j.view())
	}
	return out
}

// deviceJobDocs is the devices.jobs collection: every device result of
// every job, as documents for a query.
func (h *Hub) deviceJobDocs() ([]json.RawMessage, error) {
	js := h.jobs
	js.mu.Lock()
	var rows []deviceJobView
	for _, j := range js.byID {
		for i := range j.Devices {
			rows = append(rows, j.deviceView(&j.Devices[i]))
		}
	}
	js.mu.Unlock()
	slices.SortFunc(rows, func(a, b deviceJobView) int {
		if c := strings.Compare(a.JobID, b.JobID); c != 0 {
			return c
		}
		return strings.Compare(a.DeviceID, b.DeviceID)
	})
	out := make([]json.RawMessage, 0, len(rows))
	for _, r := range rows {
		b, err := json.Marshal(r)
		if err != nil {
			return nil, err
		}
		out = append(out, b)
	}
	return out, nil
}
