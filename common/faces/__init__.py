"""Faces in photos, shared by ``uvprep`` (the build's geometry stage) and ``uvtrain infer``: detection
(:mod:`common.faces.detect`: FaceBoxes, OpenCV's Haar cascade, fixed boxes for aligned portraits), the 3DDFA_V2
regressor (:mod:`common.faces.tddfa`) and the shape fitter that frames a face and fits the 62 parameters
(:mod:`common.faces.fit`)."""
