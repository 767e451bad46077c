package main

import (
	"net/http/httptest"
	"strings"
	"testing"
)

func TestReportShape(t *testing.T) {
	req := httptest.NewRequest("GET", "http://hello.default:8080/", nil)
	req.RemoteAddr = "10.42.0.7:51234"
	req.Header.Set("Accept", "*/*")
	req.Header.Set("User-Agent", "curl/7.71.1")
	rec := httptest.NewRecorder()
	echo(rec, req)
	want := `CLIENT VALUES:
client_address=10.42.0.7
command=GET
real path=/
query=nil
request_version=1.1
request_uri=http://hello.default:8080/

SERVER VALUES:
server_version=nginx: 1.10.0 - lua: 10001

HEADERS RECEIVED:
accept=*/*
host=hello.default:8080
user-agent=curl/7.71.1
BODY:
-no body in request-`
	if got := rec.Body.String(); got != want {
		t.Fatalf("report mismatch\n got: %q\nwant: %q", got, want)
	}
}

func TestReportQueryAndBody(t *testing.T) {
	req := httptest.NewRequest("POST", "/a/b?x=1&y=2", strings.NewReader("payload"))
	req.Host = "Svc.NS"
	rec := httptest.NewRecorder()
	echo(rec, req)
	got := rec.Body.String()
	for _, line := range []string{
		"command=POST\n", "real path=/a/b?x=1&y=2\n", "query=x=1&y=2\n",
		"request_uri=http://svc.ns:8080/a/b?x=1&y=2\n", "host=Svc.NS\n", "BODY:\npayload",
	} {
		if !strings.Contains(got, line) {
			t.Errorf("missing %q in\n%s", line, got)
		}
	}
}
